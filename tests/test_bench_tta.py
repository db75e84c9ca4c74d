"""`python -m bench gpu --checks tta` in its tiny form on the CPU: CIFAR-10 archives in the shared layout
(built here from the embedded sample), sharded by the check itself, calibrated, trained for the epochs
the budget allows and evaluated by kNN; the row carries images/s, epochs and the kNN top-1."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from bench.gpu import main as bench_gpu

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data" / "cifar10_mini"


def _archives(out: Path) -> Path:
    """train-00.tar (members train/<class>/NNNN.jpg) and test.tar (test/<class>/...), as ../shared/data."""
    out.mkdir()
    for split, name, folder in (("train", "train-00.tar", "train"), ("test", "test.tar", "val")):
        with tarfile.open(out / name, "w") as tar:
            for image in sorted((SAMPLE / folder).glob("*/*.jpg")):
                tar.add(image, arcname=f"{split}/{image.parent.name}/{image.name}")
    return out


@pytest.mark.slow  # three processes importing torch (calibration, training, sharding) on a CPU
def test_tta_runs_its_whole_path_in_a_tiny_form(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cifar = _archives(tmp_path / "cifar10")
    argv = ["--checks", "tta", "--work", str(tmp_path / "work"), "--cifar10", str(cifar), "--budget-s", "1",
            "--limit", "100", "--calibration-steps", "2", "--tta-set", "model.backbone=tiny",
            "data.batch_size=25", "model.projector.hidden_dim=64"]  # fmt: skip
    bench_gpu(argv)  # 1 if the goal is missed (it is, at this size), 0 if reached
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    (row,) = rows
    figures = row["figures"]
    assert row["check"] == "tta" and row["status"] in ("pass", "fail"), row
    assert figures["epochs"] >= 1 and figures["train_images"] == 100 and figures["images_per_s"] > 0, row
    assert 0.0 <= figures["knn_top1"] <= 1.0 and "kNN top-1" in row["detail"]
    shards = json.loads((tmp_path / "work" / "cifar10-100" / "test" / "manifest.json").read_text())
    assert sum(s["samples"] for s in shards["splits"]["train"]["shards"]) == 100  # 10 per class
