"""Commands that talk: the start banner and end summary of `pipeline.train`, a finished run re-run says so,
a backend or engine that is not installed is refused in one line, and the console scripts exist."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pipeline.train import main

ROOT = Path(__file__).resolve().parents[1]
DEBUG = str(ROOT / "configs" / "debug.yaml")


def test_banner_summary_and_a_finished_run_rerun(sample_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["--config", DEBUG, f"data.train_shards={sample_shards}", f"run.output_dir={out}"]
    argv += ["train.max_steps=2", "logging.progress_bar=false", "logging.wandb.mode=disabled"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # sample_shards: 2,000 images; batch 16 on one rank -> 125 steps an epoch, lr 0.05 x 16 / 256
    assert f"pipeline.train: simclr on tiny, {out}\n" in printed
    assert f"data: 2,000 samples/epoch from {sample_shards} (backend cpu, 32 px)" in printed
    assert "steps: 125/epoch x 1 epoch(s), to step 2" in printed
    assert "world size 1 (ddp on cpu); global batch 16 (16 x 1 rank(s) x 1 accumulation)" in printed
    assert "peak lr 0.003125 (0.05 x 16/256, linear)" in printed
    assert (
        f"pipeline.train: finished at step 2 (epoch 0); checkpoint {out}/checkpoints/step-00000002" in printed
    )
    assert f"next: python -m pipeline.eval knn --checkpoint {out}" in printed

    assert main(argv) == 0  # the same command again: nothing left to train, and it says so
    again = capsys.readouterr().out
    assert "the run is finished" in again and "nothing to do" in again
    assert "finished at step 2" in again


@pytest.mark.parametrize(
    ("blocked", "override", "message"),
    [
        (
            "nvidia.dali",
            "data.backend=dali",
            "config error: data.backend=dali needs nvidia.dali, which is not installed: "
            "pip install '.[dali]', or use data.backend=torch",
        ),
        (
            "deepspeed",
            "train.engine=deepspeed",
            "config error: train.engine=deepspeed needs deepspeed, which is not installed: "
            "pip install '.[deepspeed]', or use train.engine=ddp",
        ),
    ],
)
def test_a_backend_or_engine_not_installed_is_refused_in_one_line(
    blocked: str, override: str, message: str, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, blocked, None)  # Python's own way to make an import fail
    out = tmp_path / "run"
    argv = ["--config", DEBUG, "data.train_shards=x", f"run.output_dir={out}", override, "optim.name=sgd"]
    assert main(argv) == 2
    assert capsys.readouterr().err == message + "\n"
    assert not out.exists()  # refused before any work


def test_console_scripts_point_at_the_commands() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"contrastive-train", "contrastive-eval", "contrastive-export", "contrastive-dashboard"} <= set(
        scripts
    )
    for target in scripts.values():
        module, _, name = target.partition(":")
        assert callable(getattr(importlib.import_module(module), name)), target
    installed = Path(sys.executable).parent / "contrastive-train"  # `make` installs the project editable
    proc = subprocess.run(
        [str(installed), "--config", "configs/cifar10_simclr.yaml", "--print-config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "name: cifar10_simclr" in proc.stdout
