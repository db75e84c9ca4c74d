"""`python -m pipeline.dashboard --entity E --project P` — the W&B workspace a pretraining run is read in.

Built as code with `wandb-workspaces`: sections for the loss and schedule, representation quality (online
kNN, embedding std and map, `pipeline.eval` results) and the system (images/s, data-wait, step time, GPU
memory), each panel plotted against the optimizer step (`pipeline.engine.logger.STEP_METRIC`). Every
panel names a key the trainer or `pipeline.eval` logs (tests/test_wandb_dashboard.py reads a run back).

  python -m pipeline.dashboard --entity me --project contrastive-pipeline            # saves, prints its URL
  python -m pipeline.dashboard --entity me --project contrastive-pipeline --dry-run  # lists the panels

Saving needs W&B credentials (WANDB_API_KEY or `wandb login`) and the network; `--dry-run` needs neither.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.engine.logger import STEP_METRIC

# (section, [(panel title, [metrics])]); one line plot per panel unless it is an image.
SECTIONS: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "Training",
        [
            ("loss", ["train/loss"]),
            ("learning rate", ["train/lr"]),
            ("gradient norm (before clipping)", ["train/grad_norm"]),
            ("weight decay and momentum", ["train/weight_decay", "train/momentum"]),
            ("skipped non-finite steps", ["train/bad_steps"]),
        ],
    ),
    (
        "Representation",
        [
            ("online kNN top-1 (val)", ["val/knn_top1"]),
            ("embedding std (collapse -> 0)", ["val/embed_std"]),
            ("pipeline.eval top-1", ["eval/knn_top1", "eval/linear_top1"]),
            ("embedding map", ["val/embedding_map"]),
        ],
    ),
    (
        "System",
        [
            ("images/s (all GPUs)", ["sys/images_per_s"]),
            ("images/s per GPU", ["sys/images_per_s_per_gpu"]),
            ("data-wait fraction (input-bound > 0.1)", ["sys/data_wait_frac"]),
            ("step time (s)", ["sys/step_time_s"]),
            ("GPU memory, peak (GiB)", ["sys/gpu_mem_gib"]),
        ],
    ),
]
IMAGES = {"val/embedding_map"}


def build_workspace(entity: str, project: str, name: str = "pretraining") -> Any:
    """The workspace object (nothing is sent: `.save()` does that)."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    def panel(title: str, metrics: list[str]) -> Any:
        if set(metrics) <= IMAGES:
            return wr.MediaBrowser(title=title, media_keys=metrics)
        return wr.LinePlot(title=title, x=STEP_METRIC, y=metrics)

    sections = [
        ws.Section(name=section, is_open=True, panels=[panel(t, m) for t, m in panels])
        for section, panels in SECTIONS
    ]
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def panel_metrics(workspace: Any) -> dict[str, list[str]]:
    """Panel title -> the metric keys it plots (x axis included), read back from the workspace object."""
    out = {}
    for section in workspace.sections:
        for p in section.panels:
            keys = list(getattr(p, "y", None) or getattr(p, "media_keys", None) or [])
            x = getattr(p, "x", None)
            out[p.title] = [*keys, *([x] if x else [])]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--entity", required=True, help="W&B user or team")
    parser.add_argument("--project", default="contrastive-pipeline", help="logging.wandb.project of the runs")
    parser.add_argument("--name", default="pretraining", help="the workspace's name")
    parser.add_argument("--dry-run", action="store_true", help="list the panels; save nothing")
    args = parser.parse_args(argv)
    try:
        workspace = build_workspace(args.entity, args.project, args.name)
    except ImportError:
        print("pipeline.dashboard: needs wandb-workspaces: pip install '.[wandb]'", file=sys.stderr)
        return 2
    if args.dry_run:
        for title, metrics in panel_metrics(workspace).items():
            print(f"{title}: {', '.join(metrics)}")
        return 0
    try:
        saved = workspace.save()
    except Exception as e:  # no credentials, no network, no such entity/project
        print(f"pipeline.dashboard: W&B did not save the workspace ({type(e).__name__}: {e})".splitlines()[0])
        return 2
    print(saved.url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
