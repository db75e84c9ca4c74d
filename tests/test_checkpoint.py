"""Checkpoint store: atomic layout, keep-last-K, newest complete, path resolution, local and S3."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.engine.checkpoint import CheckpointError, CheckpointStore, find_step_dir, read_object, step_name


def _state(step: int) -> dict:
    return {"step": step, "model": {"w": torch.full((2,), float(step))}}


def _exercise(root: str) -> None:
    store = CheckpointStore(root, keep_last=2)
    assert store.newest() is None
    for step in (1, 2, 3):
        store.save(step, _state(step), extra=lambda d: (d / "model.pt").write_bytes(b"x"))
    fs, path = fsspec.core.url_to_fs(root)
    assert store.complete_steps() == [2, 3]  # keep_last=2 pruned step 1
    assert store.newest() == f"{root}/{step_name(3)}"
    assert fs.cat(f"{path}/latest").decode().strip() == "step-00000003"
    assert fs.exists(f"{path}/step-00000003/model.pt")
    assert read_object(f"{store.newest()}/state.pt")["model"]["w"].tolist() == [3.0, 3.0]
    # A folder without state.pt (a writer killed mid-way) is never picked.
    fs.makedirs(f"{path}/step-00000009", exist_ok=True)
    with fs.open(f"{path}/step-00000009/model.pt", "wb") as f:
        f.write(b"partial")
    assert store.newest() == f"{root}/{step_name(3)}"
    assert find_step_dir(root) == f"{root}/{step_name(3)}"
    assert find_step_dir(f"{root}/{step_name(2)}/state.pt") == f"{root}/{step_name(2)}"
    # `latest` naming a deleted step (removed by hand, or a store that lost it): resume uses what is there.
    fs.rm(f"{path}/step-00000003", recursive=True)
    assert fs.cat(f"{path}/latest").decode().strip() == "step-00000003"
    step_dir, state = store.newest_intact()
    assert step_dir == f"{root}/{step_name(2)}" and state["step"] == 2
    # A damaged state.pt (its checksum no longer matches) is named and skipped.
    fs.pipe_file(f"{path}/step-00000002/state.pt", fs.cat(f"{path}/step-00000002/state.pt")[:-1] + b"!")
    warnings: list[str] = []
    with pytest.raises(CheckpointError, match=r"no intact checkpoint under .* step-00000002 is damaged"):
        store.newest_intact(warnings.append)


def test_local_store(tmp_path: Path) -> None:
    root = str(tmp_path / "run" / "checkpoints")
    _exercise(root)
    assert find_step_dir(str(tmp_path / "run")) == f"{root}/step-00000002"  # a run dir works too
    leftovers = [p.name for p in Path(root).iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporaries left behind


def test_local_save_is_atomic(tmp_path: Path) -> None:
    """A crash while writing leaves only a hidden temporary that is neither resumed nor kept."""
    store = CheckpointStore(str(tmp_path), keep_last=3)
    store.save(1, _state(1))

    def crash(_: Path) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.save(2, _state(2), extra=crash)
    assert store.complete_steps() == [1]
    assert (tmp_path / ".tmp-step-00000002").exists()
    store.save(3, _state(3))
    assert not (tmp_path / ".tmp-step-00000002").exists()
    assert sorted(os.listdir(tmp_path / "step-00000003")) == ["state.pt", "state.sha256"]


def test_s3_store(s3_server) -> None:
    s3_server.make_bucket("ckpt-unit")
    _exercise("s3://ckpt-unit/run/checkpoints")
