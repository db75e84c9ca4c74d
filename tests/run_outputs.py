"""A training run's output folder read back: its metrics rows and its newest checkpoint."""

from __future__ import annotations

import json
from pathlib import Path


def metrics_rows(out: Path) -> list[dict]:
    """Every row of `out/metrics.jsonl`, in order."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def step_rows(out: Path) -> list[dict]:
    """The training steps' rows (those with a loss), in order; a step redone after a resume is there twice."""
    return [row for row in metrics_rows(out) if "loss" in row]


def world_size_of(out: Path) -> int:
    """The run's world size, from its first step's throughput columns (global / per process)."""
    row = step_rows(out)[0]
    return round(row["images_per_s"] / row["images_per_s_per_gpu"])


def checkpoint_step(out: Path) -> int:
    """The step of the newest checkpoint (`out/checkpoints/latest`); -1 before the first."""
    latest = out / "checkpoints" / "latest"
    return int(latest.read_text().strip().removeprefix("step-")) if latest.is_file() else -1
