"""`python -m pipeline.eval {knn,linear,finetune,embed,report} --checkpoint CKPT ...`

Examples:
  python -m pipeline.eval knn --checkpoint runs/cifar10_simclr
  python -m pipeline.eval knn --checkpoint runs/cifar10_simclr --random-init      # the baseline
  python -m pipeline.eval linear --checkpoint runs/cifar10_simclr/checkpoints/step-00019500
  python -m pipeline.eval finetune --checkpoint runs/x --label-fractions 0.01 0.1 1.0 --epochs 5
  python -m pipeline.eval embed --checkpoint runs/x --method tsne
  python -m pipeline.eval report --checkpoint runs/x

Each metric command writes `OUT/<protocol>-<pretrained|random>.json` (OUT defaults to RUN_DIR/eval for a
local checkpoint) and prints it as one JSON line; `report` gathers them into OUT/report.{md,html}.
When the training logged to W&B, the results go into its W&B run too (resumed by the id the checkpoint
saved): eval/<protocol>_top1 (eval/<protocol>_random_top1 for --random-init) at the checkpoint's step.
`--no-wandb` keeps them local.
Shards default to the run's data.train_shards (the kNN bank / probe training set) and data.val_shards.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline.eval.features import Backbone, extract_features, load_backbone

COMMANDS = ("knn", "linear", "finetune", "embed", "report")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir, step dir or state.pt")
    common.add_argument("--out", help="folder for results (default: RUN_DIR/eval)")
    common.add_argument("--no-wandb", action="store_true", help="do not log results into the run's W&B run")
    data = argparse.ArgumentParser(add_help=False)
    data.add_argument(
        "--train-shards", help="labelled shards for the bank / training (default data.train_shards)"
    )
    data.add_argument("--val-shards", help="labelled held-out shards (default data.val_shards)")
    data.add_argument("--image-size", type=int, help="eval crop in px (default data.image_size)")
    data.add_argument("--batch-size", type=int, default=256)
    data.add_argument("--num-workers", type=int, default=0)
    data.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    data.add_argument("--random-init", action="store_true", help="evaluate the same backbone at random init")
    data.add_argument("--seed", type=int, default=0)

    knn = sub.add_parser("knn", parents=[common, data], help="weighted kNN top-1/top-5")
    knn.add_argument("--k", type=int, default=200)
    knn.add_argument("--temperature", type=float, default=0.1)
    linear = sub.add_parser("linear", parents=[common, data], help="linear probe on frozen features")
    linear.add_argument("--epochs", type=int, default=100)
    linear.add_argument("--lrs", type=float, nargs="+", default=None, help="learning rates to sweep")
    linear.add_argument("--weight-decays", type=float, nargs="+", default=None, help="weight decays to sweep")
    ft = sub.add_parser("finetune", parents=[common, data], help="full fine-tuning (also on label subsets)")
    ft.add_argument("--epochs", type=int, default=5)
    ft.add_argument("--lr", type=float, default=0.01, help="backbone lr (the head uses 10x)")
    ft.add_argument("--label-fractions", type=float, nargs="+", default=[1.0, 0.1, 0.01])
    embed = sub.add_parser("embed", parents=[common, data], help="2-D map of val embeddings as PNG")
    embed.add_argument("--method", choices=("pca", "tsne", "umap"), default="tsne")
    embed.add_argument("--max-samples", type=int, default=5000, help="t-SNE is O(N log N); cap the points")
    sub.add_parser("report", parents=[common], help="Markdown + HTML report of the run and its eval results")
    return parser


def run_dir_of(checkpoint: str) -> Path | None:
    """The local run folder a checkpoint belongs to (RUN/checkpoints/step-N), or None for a URL."""
    from pipeline.engine.checkpoint import find_step_dir, is_local

    if not is_local(checkpoint):
        return None
    step_dir = Path(find_step_dir(checkpoint))
    return step_dir.parent.parent if step_dir.parent.name == "checkpoints" else step_dir.parent


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    run_dir = run_dir_of(args.checkpoint)
    if run_dir is None:
        raise SystemExit("--out is required for a checkpoint that is not on the local filesystem")
    return run_dir / "eval"


def _split(shards: str, wanted: str) -> str | None:
    """The split to read: None when the manifest holds one, else `wanted` (train/val sharded together)."""
    from data_prep.manifest import read_manifest

    return wanted if len(read_manifest(shards).get("splits", {})) > 1 else None


def _loader(backbone: Backbone, args: argparse.Namespace, which: str) -> Any:
    from pipeline.data import build_eval_loader

    data = backbone.config.data
    shards = getattr(args, f"{which}_shards") or getattr(data, f"{which}_shards")
    if not shards:
        raise SystemExit(f"no {which} shards: pass --{which}-shards (the run's data.{which}_shards is empty)")
    return build_eval_loader(
        shards,
        image_size=args.image_size or data.image_size,
        batch_size=args.batch_size,
        split=_split(shards, which),
        num_workers=args.num_workers,
        device=args.device,
    )


def _num_classes(loader: Any, *labels: torch.Tensor) -> int:
    return max(len(loader.classes), *(int(y.max()) + 1 for y in labels))


def _write(args: argparse.Namespace, protocol: str, backbone: Backbone, result: dict[str, Any]) -> dict:
    tag = "pretrained" if backbone.pretrained else "random"
    row = {
        "protocol": protocol,
        "backbone": f"{backbone.config.model.backbone} {tag if backbone.pretrained else 'random init'}",
        "top1": result.pop("top1"),
        "top5": result.pop("top5"),
        "details": result,
        "checkpoint": args.checkpoint,
    }
    out = _out_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{protocol}-{tag}.json").write_text(json.dumps(row, indent=1) + "\n")
    print(json.dumps(row), flush=True)
    return row


def _frozen(args: argparse.Namespace) -> tuple[Backbone, Any, tuple[torch.Tensor, ...]]:
    backbone = load_backbone(args.checkpoint, random_init=args.random_init, seed=args.seed)
    val = _loader(backbone, args, "val")
    train_x, train_y = extract_features(backbone.module, _loader(backbone, args, "train"), args.device)
    val_x, val_y = extract_features(backbone.module, val, args.device)
    return backbone, val, (train_x, train_y, val_x, val_y)


def cmd_knn(args: argparse.Namespace) -> dict:
    from pipeline.eval.knn import knn_accuracy

    backbone, val, (train_x, train_y, val_x, val_y) = _frozen(args)
    n_cls = _num_classes(val, train_y, val_y)
    acc = knn_accuracy(
        train_x, train_y, val_x, val_y, num_classes=n_cls, k=args.k, temperature=args.temperature
    )
    return _write(args, "knn", backbone, {**acc, "k": args.k, "temperature": args.temperature})


def cmd_linear(args: argparse.Namespace) -> dict:
    from pipeline.eval.linear import LEARNING_RATES, WEIGHT_DECAYS, linear_probe

    backbone, val, (train_x, train_y, val_x, val_y) = _frozen(args)
    result = linear_probe(
        train_x.to(args.device),
        train_y.to(args.device),
        val_x.to(args.device),
        val_y.to(args.device),
        num_classes=_num_classes(val, train_y, val_y),
        learning_rates=args.lrs or LEARNING_RATES,
        weight_decays=args.weight_decays or WEIGHT_DECAYS,
        epochs=args.epochs,
        seed=args.seed,
    )
    result.pop("sweep")
    return _write(args, "linear", backbone, {**result, "epochs": args.epochs})


def cmd_finetune(args: argparse.Namespace) -> list[dict]:
    from pipeline.eval.finetune import finetune

    backbone = load_backbone(args.checkpoint, random_init=args.random_init, seed=args.seed)
    train, val = _loader(backbone, args, "train"), _loader(backbone, args, "val")
    if not val.classes:
        raise SystemExit(
            "fine-tuning needs class names in the val manifest (shards written with --labels auto)"
        )
    rows = []
    for fraction in args.label_fractions:
        result = finetune(
            backbone.module,
            backbone.feature_dim,
            train,
            val,
            num_classes=len(val.classes),
            label_fraction=fraction,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            head_lr=10 * args.lr,
            seed=args.seed,
            device=args.device,
        )
        rows.append(_write(args, f"finetune-{fraction:g}", backbone, {**result, "epochs": args.epochs}))
    return rows


def cmd_embed(args: argparse.Namespace) -> Path:
    from pipeline.eval.embed import embedding_map

    backbone = load_backbone(args.checkpoint, random_init=args.random_init, seed=args.seed)
    val = _loader(backbone, args, "val")
    x, y = extract_features(backbone.module, val, args.device)
    keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(args.seed))[: args.max_samples]
    tag = "pretrained" if backbone.pretrained else "random"
    png = _out_dir(args) / f"embedding_map-{args.method}-{tag}.png"
    title = f"{args.method.upper()} of {len(keep)} val embeddings ({tag})"
    embedding_map(
        x[keep], y[keep], png, method=args.method, class_names=list(val.classes) or None, title=title
    )
    print(json.dumps({"embedding_map": str(png)}), flush=True)
    return png


def cmd_report(args: argparse.Namespace) -> tuple[Path, Path]:
    from pipeline.eval.report import write_report

    run_dir = run_dir_of(args.checkpoint)
    if run_dir is None:
        raise SystemExit("report needs a local run folder (metrics.jsonl, config.yaml)")
    md, page = write_report(run_dir, _out_dir(args))
    print(json.dumps({"markdown": str(md), "html": str(page)}), flush=True)
    return md, page


def log_to_wandb(checkpoint: str, rows: list[dict], random_init: bool) -> str | None:
    """`rows` into the W&B run of the training they evaluate, resumed by the id its checkpoint saved, at
    the checkpoint's optimizer step. Returns that run's id; None when the training logged no W&B."""
    from pipeline.engine.checkpoint import find_state
    from pipeline.engine.logger import STEP_METRIC, define_metrics, wandb_mode

    _, state = find_state(checkpoint)
    wb = state.get("config", {}).get("logging", {}).get("wandb", {})
    run_id, mode = state.get("wandb_run_id"), wandb_mode(wb.get("mode", "disabled"))
    if not run_id or mode == "disabled":
        return None
    import wandb

    run_dir = run_dir_of(checkpoint)
    suffix = "_random" if random_init else ""
    values = {f"eval/{row['protocol']}{suffix}_{k}": row[k] for row in rows for k in ("top1", "top5")}
    try:
        run = wandb.init(
            project=wb.get("project"),
            entity=wb.get("entity"),
            id=run_id,
            resume="allow",
            mode=mode,
            dir=str(run_dir) if run_dir is not None else None,
            settings=wandb.Settings(console="off", silent=True),
        )
    except wandb.errors.Error as e:  # the results are written; W&B is a copy
        print(f"pipeline.eval: not logged to W&B ({type(e).__name__}: {e})".splitlines()[0], file=sys.stderr)
        return None
    define_metrics(run)
    run.log({STEP_METRIC: state.get("step", 0), **values})
    run.finish()
    return run_id


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 the checkpoint is missing or damaged (a folder of checkpoints falls back to
    its newest intact step), or --out is not writable: one line, before any work."""
    from pipeline.engine.checkpoint import CheckpointError

    args = _parser().parse_args(argv)
    try:
        out = _out_dir(args)
        try:
            out.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=out).close()
        except OSError as e:
            print(
                f"pipeline.eval: --out {out} is not writable ({e.strerror}); choose another --out",
                file=sys.stderr,
            )
            return 2
        done = {
            "knn": cmd_knn,
            "linear": cmd_linear,
            "finetune": cmd_finetune,
            "embed": cmd_embed,
            "report": cmd_report,
        }[args.command](args)
        rows = [done] if isinstance(done, dict) else done if isinstance(done, list) else []
        if rows and not args.no_wandb:
            log_to_wandb(args.checkpoint, rows, args.random_init)
    except CheckpointError as e:
        print(f"pipeline.eval: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
