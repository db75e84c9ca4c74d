"""`python -m bench step` on the CPU at tiny scale: both rates and their ratio, as one JSON line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.step import main


def test_bench_step_prints_rates_and_ratio(
    sample_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--steps",
        "2",
        "--warmup",
        "0",
        f"data.train_shards={sample_shards}",
        f"run.output_dir={tmp_path}",
    ]
    assert main(argv) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["bench"] == "step" and row["device"] == "cpu" and row["global_batch_size"] == 16
    assert row["synthetic_images_per_s"] > 0 and row["pipeline_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(
        row["pipeline_images_per_s"] / row["synthetic_images_per_s"], rel=1e-2
    )
