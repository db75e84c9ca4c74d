"""End-to-end training runs from the sample shards: torchrun with 2 gloo ranks (DDP and DeepSpeed ZeRO-1),
checkpoint and resume (local and S3), exact resume after SIGKILL, SIGTERM, NaN handling, W&B offline files.

Each run is a real `python -m pipeline.train` process; runs are tiny (a few steps of the debug config).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.engine.checkpoint import load_for_eval

from run_outputs import metrics_rows, step_rows
from wandb_records import wandb_records

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))


def _overrides(shards: Path, val: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"data.train_shards={shards}",
        f"data.val_shards={val}",
        f"run.output_dir={out}",
        "logging.every_steps=1",
        "logging.progress_bar=false",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", **extra}
    env.pop("WANDB_API_KEY", None)
    return env


def _train_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    entry = ["-m", "pipeline.train", "--config", str(ROOT / "configs" / "debug.yaml"), *overrides]
    if nproc == 1:
        return [sys.executable, *entry]
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "--no-python", sys.executable, *entry]


def _run(overrides: list[str], nproc: int = 1, env: dict | None = None, timeout: int = 240):
    proc = subprocess.run(
        _train_cmd(overrides, nproc),
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _train_here(overrides: list[str]) -> int:
    """The CLI in this process (saves interpreter start-up; world size 1, no process group)."""
    from pipeline.train import main

    try:
        return main(["--config", str(ROOT / "configs" / "debug.yaml"), *overrides])
    finally:
        torch.use_deterministic_algorithms(False)  # run.deterministic=true must not leak into other tests


def _step_losses(out: Path) -> dict[int, float]:
    """Per-step loss; a step logged twice (killed after logging, before its checkpoint) keeps the last."""
    return {r["step"]: r["loss"] for r in step_rows(out)}


def _wandb_history(out: Path) -> list[dict]:
    """History rows (and the run's id) of the offline W&B run files."""
    rows = []
    for _, kind, record in wandb_records(out):
        if kind == "history":
            rows.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "run":
            rows.append({"run_id": record.run.run_id})
    return rows


def _tiny(sample_dir: Path, split: str, per_class: int, factory: pytest.TempPathFactory) -> Path:
    from conftest import shard_folder

    src = factory.mktemp(f"tiny_{split}_src")
    for cls in sorted(p.name for p in (sample_dir / split).iterdir())[:3]:
        (src / cls).mkdir()
        for image in sorted((sample_dir / split / cls).iterdir())[:per_class]:
            shutil.copy(image, src / cls / image.name)
    return shard_folder(src, factory.mktemp(f"tiny_{split}_shards"), samples_per_shard=32)


@pytest.fixture(scope="module")
def tiny_shards(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 labelled images (3 classes x 32): an epoch is 3 steps of 2 ranks x 16, so epochs end quickly."""
    return _tiny(sample_dir, "train", 32, tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_val_shards(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 held-out labelled images of the same 3 classes, the kNN queries."""
    return _tiny(sample_dir, "val", 16, tmp_path_factory)


@pytest.mark.slow
def test_ddp_simclr_two_ranks_epochs_checkpoint_resume_wandb(
    tiny_shards: Path, tiny_val_shards: Path, tmp_path: Path
):
    """2 gloo ranks, 2 epochs of 3 steps, a stop at step 4 then resume to the end; epoch-end kNN,
    embedding std and embedding map; one W&B run (offline) continued across the restart."""
    out = tmp_path / "run"
    common = _overrides(
        tiny_shards, tiny_val_shards, out, "method.name=simclr", "logging.wandb.mode=offline",
        "train.epochs=2", "train.max_steps=null", "eval.every_epochs=1", "eval.k=10", "eval.embed_map=true",
        "checkpoint.every_steps=2", "checkpoint.keep_last=2",
    )  # fmt: skip
    _run([*common, "train.max_steps=4"], nproc=2)
    assert (out / "config.yaml").exists()
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-00000003", "step-00000004"]
    state = torch.load(ckpts / "step-00000004" / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["epoch"] == 1 and len(state["rng"]) == 2
    assert [(s["epoch"], s["batches_consumed"]) for s in state["loader"]] == [(1, 1), (1, 1)]
    first_id = state["wandb_run_id"]

    _run(common, nproc=2)  # resumes from step 4, finishes epoch 1
    rows = metrics_rows(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    last = [r for r in rows if "loss" in r][-1]
    for key in ("loss", "lr", "weight_decay", "momentum", "grad_norm", "images_per_s", "images_per_s_per_gpu",
                "data_wait_frac", "step_time_s"):  # fmt: skip
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert 0 <= last["data_wait_frac"] <= 1
    epochs = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in epochs] == [(3, 0), (6, 1)]
    assert all(0 <= r["knn_top1"] <= 1 and r["embed_std"] > 0 for r in epochs)
    assert sorted(p.name for p in (out / "embedding_maps").iterdir()) == ["epoch-0000.png", "epoch-0001.png"]
    cfg, model = load_for_eval(str(out))
    assert cfg.method.name == "simclr" and any(k.startswith("backbone.") for k in model)
    assert torch.load(ckpts / "step-00000006" / "state.pt", weights_only=False)["wandb_run_id"] == first_id

    history = _wandb_history(out)
    assert {r["run_id"] for r in history if "run_id" in r} == {first_id}  # the same W&B run, resumed
    assert sorted({r["_step"] for r in history if "train/loss" in r}) == [1, 2, 3, 4, 5, 6]  # W&B groups keys
    epoch_rows = [r for r in history if "val/knn_top1" in r]
    assert [r["_step"] for r in epoch_rows] == [3, 6]
    assert all(r["val/embedding_map/_type"] == "image-file" for r in epoch_rows)


@pytest.mark.slow
def test_deepspeed_mocov2_two_ranks_s3_checkpoint_resume(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, s3_server
):
    s3_server.make_bucket("train-ckpt")
    out = tmp_path / "run"
    url = "s3://train-ckpt/mocov2/checkpoints"
    common = _overrides(
        sample_shards, sample_val_shards, out,
        "method.name=mocov2", "method.queue_size=256", "optim.name=sgd",
        "train.engine=deepspeed", "train.deepspeed_config=configs/deepspeed/zero1.json",
        "train.grad_accum_steps=2", "train.grad_clip=1.0",
        f"checkpoint.dir={url}", "checkpoint.keep_last=1", "logging.wandb.mode=disabled",
    )  # fmt: skip
    env = _env(**s3_server.env)
    _run([*common, "train.max_steps=2", "checkpoint.every_steps=2"], nproc=2, env=env)
    fs = s3_server.filesystem()
    files = sorted(p.rsplit("/", 1)[-1] for p in fs.find(url))
    assert "state.pt" in files and "model.pt" in files and "latest" in files
    assert any(f.startswith("zero_pp_rank_1") for f in files)  # rank 1's optimizer shard uploaded too
    proc = _run([*common, "train.max_steps=3", "checkpoint.every_steps=2"], nproc=2, env=env)
    fs.invalidate_cache()
    assert "resumed from s3://train-ckpt/mocov2/checkpoints/step-00000002" in proc.stdout
    rows = step_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["grad_norm"] > 0 and r["loss"] == r["loss"] for r in rows)  # ZeRO reports the global norm
    assert fs.cat(f"{url}/latest").decode().strip() == "step-00000003"
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url)) == ["latest", "step-00000003"]  # keep_last=1
    cfg, model = load_for_eval(url)
    assert cfg.train.engine == "deepspeed" and "queue" in " ".join(model)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow  # three runs, one a training process
def test_exact_resume_after_sigkill(sample_shards: Path, sample_val_shards: Path, tmp_path: Path):
    """SIGKILL after the step-2 checkpoint; the resumed run's per-step losses equal an uninterrupted run's.
    MoCo v2, so the momentum encoder, the queue and its pointer must come back exactly too."""
    extra = [
        "method.name=mocov2",
        "method.queue_size=48",
        "run.deterministic=true",
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        "logging.wandb.mode=disabled",
    ]
    straight = tmp_path / "straight"
    assert _train_here(_overrides(sample_shards, sample_val_shards, straight, *extra)) == 0

    killed = tmp_path / "killed"
    cmd = _train_cmd(_overrides(sample_shards, sample_val_shards, killed, *extra))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    latest = killed / "checkpoints" / "latest"
    _wait_for(lambda: latest.exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest.read_text().strip() in ("step-00000002", "step-00000004")
    assert _train_here(_overrides(sample_shards, sample_val_shards, killed, *extra)) == 0

    expected, got = _step_losses(straight), _step_losses(killed)
    assert sorted(expected) == sorted(got) == [1, 2, 3, 4]
    for step in expected:
        assert abs(expected[step] - got[step]) <= 1e-6, (step, expected[step], got[step])


@pytest.mark.slow  # a training process
def test_sigterm_saves_and_exits_zero(sample_shards: Path, sample_val_shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    extra = ["train.max_steps=1000", "checkpoint.every_steps=null", "logging.wandb.mode=disabled"]
    proc = subprocess.Popen(
        _train_cmd(_overrides(sample_shards, sample_val_shards, out, *extra)),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    step = max(r["step"] for r in metrics_rows(out))
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"
    assert f"stopped by SIGTERM after step {step}" in stdout


def test_nan_losses_stop_the_run_and_keep_the_last_checkpoint(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """An infinite learning rate turns the weights to Inf/NaN after step 1; two bad steps stop the run."""
    out = tmp_path / "run"
    extra = ["optim.lr=.inf", "train.max_bad_steps=2", "train.max_steps=20", "checkpoint.every_steps=1",
             "logging.wandb.mode=disabled"]  # fmt: skip
    assert _train_here(_overrides(sample_shards, sample_val_shards, out, *extra)) == 1
    err = capsys.readouterr().err
    assert "loss was NaN/Inf for 2 steps in a row" in err
    rows = step_rows(out)
    assert rows[-1]["bad_steps"] == 2 and rows[-1]["loss"] is None  # NaN is written as null: strict JSON
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{rows[-3]['step']:08d}"  # the last step with a finite loss
    assert f"the last good checkpoint, {out / 'checkpoints' / latest}, is intact" in err


def test_resume_into_another_models_checkpoint_names_the_difference(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    extra = ["train.max_steps=2", "logging.wandb.mode=disabled"]
    assert _train_here(_overrides(sample_shards, sample_val_shards, out, *extra)) == 0
    other = [*extra, "method={name: byol}", "model.projector.output_dim=16"]
    assert _train_here(_overrides(sample_shards, sample_val_shards, out, *other)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "step-00000002 was written by another model" in err
    assert "method.name is 'simclr' there, 'byol' here" in err and "model.projector.output_dim is 32" in err
