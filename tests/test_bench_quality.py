"""`python -m bench quality` at its smallest setting: a real (short) MoCo v2 run on the embedded CIFAR-10
sample, evaluated by kNN; a smoke test of the command, never a timing or accuracy threshold."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.quality import main


def test_bench_quality_trains_then_prints_knn_and_rate(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--config",
        "configs/cifar10_mocov2.yaml",
        "--train-shards",
        str(sample_shards),
        "--val-shards",
        str(sample_val_shards),
        "--keep",
        str(tmp_path),
        "data.batch_size=32",
        "data.num_workers=1",
        "method.queue_size=128",
        "train.max_steps=2",
    ]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "quality" and row["method"] == "mocov2" and row["backbone"] == "tiny"
    assert row["steps"] == 2 and row["global_batch_size"] == 32 and row["seed"] == 0
    assert 0.0 <= row["knn_top1"] <= 1.0 and row["images_per_s"] > 0
    # 10 balanced classes: a random-init backbone is far above chance on CIFAR-10, not near 100%
    assert 0.1 < row["random_init_knn_top1"] < 0.5
    assert (tmp_path / "seed-0" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    ("flag", "fix"),
    [("--val-shards", "no readable manifest.json"), ("--train-shards", "no readable manifest.json")],
)
def test_bench_quality_refuses_missing_shards_before_training(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, fix: str
) -> None:
    shards = {"--train-shards": str(sample_shards), "--val-shards": str(sample_shards)}
    shards[flag] = str(tmp_path / "nowhere")
    argv = [arg for pair in shards.items() for arg in pair] + ["--keep", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err and fix in err
    assert not (tmp_path / "runs").exists()


def test_bench_quality_refuses_unknown_key(sample_shards: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--train-shards", str(sample_shards), "--val-shards", str(sample_shards), "method.queue=4"]
    assert main(argv) == 2
    assert "method.queue" in capsys.readouterr().err
