"""W&B as users expect, read back from the offline run files: grouped keys against the optimizer step,
the best kNN as summary, job_type and group, `pipeline.eval` results in the same run; and the dashboard
built offline names only metrics that the trainer or `pipeline.eval` logs."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from conftest import shard_folder

from pipeline.dashboard import build_workspace, panel_metrics
from pipeline.dashboard import main as dashboard_main
from pipeline.engine.logger import CUDA_ONLY_KEYS, STEP_METRIC
from pipeline.eval.__main__ import main as eval_main

from wandb_records import wandb_records

ROOT = Path(__file__).resolve().parents[1]


def _history(records: list) -> list[tuple[str, dict]]:
    return [
        (f, {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item})
        for f, kind, r in records
        if kind == "history"
    ]


@pytest.fixture(scope="module")
def run(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One epoch of 6 steps (96 images, batch 16) with the online kNN and embedding map at its end, W&B
    offline; then `pipeline.eval knn` and `linear` on its checkpoint (the same 96 images as bank and
    queries: only the logging is under test, and small sets keep it fast)."""
    from pipeline.train import main

    src = tmp_path_factory.mktemp("wb_src")
    for cls in sorted(p.name for p in (sample_dir / "train").iterdir())[:3]:
        (src / cls).mkdir()
        for image in sorted((sample_dir / "train" / cls).iterdir())[:32]:
            shutil.copy(image, src / cls / image.name)
    shards = shard_folder(src, tmp_path_factory.mktemp("wb_shards"), samples_per_shard=32)
    out = tmp_path_factory.mktemp("wb_run")
    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), f"data.train_shards={shards}"]
    argv += [f"data.val_shards={shards}", f"run.output_dir={out}", "logging.progress_bar=false"]
    argv += ["logging.wandb.mode=offline", "train.max_steps=null", "eval.every_epochs=1", "eval.k=10"]
    argv += ["eval.embed_map=true", "run.name=wbtest", "logging.wandb.log_checkpoints=true"]
    assert main(argv) == 0
    common = ["--checkpoint", str(out), "--batch-size", "250"]
    _next_second()
    assert eval_main(["knn", *common, "--k", "10"]) == 0
    _next_second()
    assert eval_main(["linear", *common, "--epochs", "2", "--lrs", "0.1", "--weight-decays", "0"]) == 0
    return out


def _next_second() -> None:
    """W&B names an offline run's folder by the second it starts and the run id, which every resume of
    the training run shares: two resumes within one second would write one folder."""
    time.sleep(1.01 - time.time() % 1)


def test_training_run_has_groups_step_axis_max_summary_job_type_and_group(run: Path) -> None:
    records = wandb_records(run)
    runs = [r.run for _, kind, r in records if kind == "run"]
    train_run = runs[0]
    assert (train_run.job_type, train_run.run_group) == ("pretrain", "wbtest")
    metrics = {(r.metric.name or r.metric.glob_name): r.metric for _, kind, r in records if kind == "metric"}
    for group in ("train/*", "val/*", "sys/*", "eval/*"):
        assert metrics[group].step_metric == STEP_METRIC, group
    assert metrics["val/knn_top1"].summary.max and metrics["eval/knn_top1"].summary.max

    files = sorted({f for f, _, _ in records})
    assert len(files) == 3  # the training run, then pipeline.eval knn and linear resuming it
    rows = [row for f, row in _history(records) if f == files[0]]
    steps = [row[STEP_METRIC] for row in rows if "train/loss" in row]
    assert steps == [1, 2, 3, 4, 5, 6] and all(r["_step"] == r[STEP_METRIC] for r in rows)
    last = [r for r in rows if "train/loss" in r][-1]
    for key in ("train/lr", "train/grad_norm", "sys/images_per_s", "sys/data_wait_frac", "sys/step_time_s"):
        assert key in last, key
    assert not any(k in last for k in ("loss", "lr", "images_per_s"))  # no flat names left in W&B
    epoch_end = [r for r in rows if "val/knn_top1" in r]
    assert len(epoch_end) == 1 and epoch_end[0][STEP_METRIC] == 6 and epoch_end[0]["val/embed_std"] > 0
    assert any(r.get("val/embedding_map/_type") == "image-file" for r in rows)
    metrics_rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "loss" in metrics_rows[0] and "train/loss" not in metrics_rows[0]  # metrics.jsonl stays flat


def test_the_last_checkpoint_is_a_model_artifact_when_asked(run: Path) -> None:
    artifacts = [r.artifact for _, kind, r in wandb_records(run) if kind == "artifact"]
    assert len(artifacts) == 1
    (artifact,) = artifacts
    assert artifact.type == "model" and artifact.name == f"checkpoint-{artifact.run_id}"
    assert set(artifact.aliases) == {"latest", "step-00000006"}
    assert json.loads(artifact.metadata) == {"step": 6}
    files = {entry.path for entry in artifact.manifest.contents}
    assert "state.pt" in files and files == {
        p.name for p in (run / "checkpoints" / "step-00000006").iterdir()
    }


def test_pipeline_eval_logs_into_the_training_run_at_its_step(run: Path) -> None:
    records = wandb_records(run)
    ids = {r.run.run_id for _, kind, r in records if kind == "run"}
    assert len(ids) == 1  # resumed by the id the checkpoint saved, not a new run
    files = sorted({f for f, _, _ in records})
    evals = [row for f, row in _history(records) if f != files[0]]
    knn = json.loads((run / "eval" / "knn-pretrained.json").read_text())
    linear = json.loads((run / "eval" / "linear-pretrained.json").read_text())
    assert [r[STEP_METRIC] for r in evals] == [6, 6]
    assert evals[0]["eval/knn_top1"] == pytest.approx(knn["top1"])
    assert evals[1]["eval/linear_top1"] == pytest.approx(linear["top1"])


def test_every_dashboard_panel_names_a_metric_that_is_logged(run: Path, capsys) -> None:
    logged = {STEP_METRIC, *CUDA_ONLY_KEYS}  # GPU memory is logged on CUDA only
    for _, row in _history(wandb_records(run)):
        logged |= {k.removesuffix("/_type") for k in row}
    workspace = build_workspace("someone", "contrastive-pipeline")
    panels = panel_metrics(workspace)
    assert len(panels) >= 10
    for title, metrics in panels.items():
        assert metrics and set(metrics) <= logged, (title, sorted(set(metrics) - logged))
    wanted = {"train/loss", "train/lr", "val/knn_top1", "val/embed_std", "sys/images_per_s"}
    wanted |= {"sys/data_wait_frac", "sys/gpu_mem_gib", "train/grad_norm"}
    assert wanted <= {m for ms in panels.values() for m in ms}  # the panels the issue names
    spec = workspace._to_model().model_dump_json()  # the view W&B would save, built offline
    assert '"train/loss"' in spec or "train/loss" in spec
    assert dashboard_main(["--entity", "someone", "--dry-run"]) == 0
    assert "loss: train/loss, step" in capsys.readouterr().out
