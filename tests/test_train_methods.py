"""DINO, SwAV, triplet and SimCLR with hard negatives train end to end under `pipeline.train`: each under
both engines (DDP in this process; DeepSpeed in one subprocess that runs them in turn) and both loaders
(CPU and DALI in CPU mode), two steps of the debug config from the sample shards."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.engine.checkpoint import load_for_eval

from run_outputs import metrics_rows

ROOT = Path(__file__).resolve().parents[1]
MULTICROP = ["data.local_crops=2", "data.local_image_size=16"]
METHODS = {  # name: overrides; multi-crop recipes with two small local crops
    "dino": ["method={name: dino, out_dim: 64, freeze_last_layer_steps: 1}", "data.recipe=dino", *MULTICROP],
    "swav": ["method={name: swav, num_prototypes: 16, queue_size: 32}", "data.recipe=swav", *MULTICROP],
    "triplet": ["method={name: triplet, mining: hard}"],
    "simclr_hard": ["method={name: simclr, negatives: hard, tau_plus: 0.1, beta: 1.0}"],
    "nnclr": ["method={name: nnclr, queue_size: 64}"],
    "simsiam": ["method={name: simsiam}"],
    "dcl": ["method={name: dcl, weighting: vmf}"],  # DCLW: the path with one more gather
}
# Each method meets each engine once with each loader.
DDP_BACKEND = {"dino": "dali", "swav": "cpu", "triplet": "dali", "simclr_hard": "cpu"}
DDP_BACKEND |= {"nnclr": "cpu", "simsiam": "dali", "dcl": "cpu"}
DEEPSPEED_BACKEND = {name: "cpu" if backend == "dali" else "dali" for name, backend in DDP_BACKEND.items()}
ZERO_STAGE = {"dino": 0, "swav": 0}  # DINO and SwAV edit whole gradients; ZeRO-1 for the rest


def _zero(name: str) -> str:
    return f"configs/deepspeed/zero{ZERO_STAGE.get(name, 1)}.json"


def _argv(name: str, backend: str, shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "debug.yaml"), f"data.train_shards={shards}",
        f"run.output_dir={out}", f"data.backend={backend}", "train.max_steps=2", "checkpoint.every_steps=2",
        "logging.progress_bar=false", "logging.wandb.mode=disabled", *METHODS[name], *extra,
    ]  # fmt: skip


def _check_run(name: str, out: Path) -> None:
    rows = metrics_rows(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses), (name, rows)
    cfg, model = load_for_eval(str(out / "checkpoints"))
    assert cfg.method.name == name.split("_")[0] and any(k.startswith("backbone.") for k in model)
    if name == "dino":
        assert rows[-1]["teacher_temp"] == pytest.approx(0.04) and rows[-1]["ema_momentum"] > 0.99
    if name == "swav":  # normalised after every step, whichever engine stepped
        torch.testing.assert_close(model["prototypes.weight"].norm(dim=1), torch.ones(16))


@pytest.mark.slow
def test_new_methods_train_under_ddp(sample_shards: Path, tmp_path: Path) -> None:
    from pipeline.train import main

    for name, backend in DDP_BACKEND.items():
        out = tmp_path / name
        assert main(_argv(name, backend, sample_shards, out)) == 0, name
        _check_run(name, out)


# DeepSpeed keeps process-wide group state, so one subprocess runs every method through the trainer's
# entry point on one single-process group (`python -m pipeline.train` would tear it down after each).
SCRIPT = """
import sys, json
from pipeline.config import load
from pipeline.engine.trainer import train
for argv in json.loads(sys.argv[1]):
    train(load(argv[1], argv[2:]))
"""


@pytest.mark.slow
def test_new_methods_train_under_deepspeed(sample_shards: Path, tmp_path: Path) -> None:
    engine = ["train.engine=deepspeed", "optim.name=sgd"]
    runs = [
        _argv(name, backend, sample_shards, tmp_path / name, *engine, f"train.deepspeed_config={_zero(name)}")
        for name, backend in DEEPSPEED_BACKEND.items()
    ]
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(runs)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for name in DEEPSPEED_BACKEND:
        _check_run(name, tmp_path / name)
