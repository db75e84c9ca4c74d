"""The trainer's checkpoint policy (`Checkpointer`) and its saved state (`TrainState`), in one process:
when a save is due and when it is refused, and a state captured mid-epoch that restores to the same
progress, RNG streams and next batch. The runs that prove both end to end are in test_train.py."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pipeline.config import load
from pipeline.data import build_loader
from pipeline.engine.checkpoint import CheckpointStore
from pipeline.engine.checkpointer import Checkpointer
from pipeline.engine.state import Progress, TrainState

ROOT = Path(__file__).resolve().parents[1]


def _checkpointer(root: Path, every_steps: int | None, resumed: tuple[int, str] | None = None):
    """A Checkpointer over a real store; each write saves {"step": step} there."""
    store = CheckpointStore(str(root), keep_last=10)
    return Checkpointer(store, every_steps, lambda step: store.save(step, {"step": step}), resumed), store


def test_saves_every_n_steps_at_epoch_ends_and_the_last_step_never_twice(tmp_path: Path) -> None:
    """every_steps=2, epochs of 3 steps, max_steps=7 mid-epoch: the loop offers every step, each epoch
    end and the last step; step 6 is both an every-2 step and an epoch end and is written once."""
    ckpt, store = _checkpointer(tmp_path, every_steps=2)
    for step in range(1, 8):
        ckpt.save(step, bad_streak=False)
        if step % 3 == 0:
            ckpt.save(step, bad_streak=False, epoch_end=True)
    assert ckpt.save(7, bad_streak=False, last_step=True)
    assert not ckpt.save(7, bad_streak=False, last_step=True)  # already saved
    assert store.complete_steps() == [2, 3, 4, 6, 7]
    assert ckpt.last == f"{store.root}/step-00000007"


def test_a_stop_saves_off_schedule_and_no_every_steps_saves_only_ends(tmp_path: Path) -> None:
    ckpt, store = _checkpointer(tmp_path, every_steps=None)
    assert [ckpt.due(step) for step in (1, 2, 1000)] == [False, False, False]
    assert ckpt.save(5, bad_streak=False, stopping=True)
    assert ckpt.save(6, bad_streak=False, epoch_end=True)
    assert store.complete_steps() == [5, 6]


def test_no_save_during_a_bad_streak_so_good_checkpoints_are_kept(tmp_path: Path) -> None:
    """A diverging state is never written, whatever makes the save due; `last` stays the good one."""
    ckpt, store = _checkpointer(tmp_path, every_steps=1)
    assert ckpt.save(1, bad_streak=False)
    for reason in ({}, {"epoch_end": True}, {"stopping": True}, {"last_step": True}):
        assert not ckpt.save(2, bad_streak=True, **reason)
    assert store.complete_steps() == [1] and ckpt.last == f"{store.root}/step-00000001"
    assert ckpt.save(3, bad_streak=False)  # a finite step again: saving resumes


def test_a_run_resumed_at_its_end_does_not_rewrite_its_checkpoint(tmp_path: Path) -> None:
    resumed_from = str(tmp_path / "step-00000004")
    ckpt, store = _checkpointer(tmp_path, every_steps=2, resumed=(4, resumed_from))
    assert ckpt.last == resumed_from
    assert not ckpt.save(4, bad_streak=False, last_step=True)
    assert store.complete_steps() == []
    assert ckpt.save(5, bad_streak=False, stopping=True)


def _loader(shards: Path):
    cfg = load(ROOT / "configs" / "debug.yaml", [f"data.train_shards={shards}", "run.output_dir=unused"])
    return build_loader(cfg.data, split="train", seed=cfg.run.seed)


def _draws() -> tuple[float, float, torch.Tensor]:
    return random.random(), float(np.random.rand()), torch.rand(4)


def test_state_captured_mid_epoch_restores_progress_rng_and_the_next_batch(sample_shards: Path) -> None:
    """Capture after 3 batches of epoch 1; a fresh state restored from the capture draws the same random
    numbers and continues the epoch at the same batch; the dict has the keys checkpoints have always had."""
    state = TrainState(_loader(sample_shards), rank=0, world_size=1)
    state.progress = Progress(step=7, epoch=1, wandb_run_id="abc123def456", bad_steps=2)
    batches = state.epoch_batches()
    for _ in range(3):
        next(batches)
    state.progress.batches_in_epoch = 3
    state.stopped_by = "SIGTERM"
    saved = state.capture({"run": {"seed": 0}})
    assert saved is not None
    keys = {"progress", "step", "epoch", "loader", "rng", "config", "wandb_run_id", "stopped_by"}
    assert set(saved) == keys
    assert (saved["step"], saved["epoch"], saved["wandb_run_id"]) == (7, 1, "abc123def456")
    assert [(s["epoch"], s["batches_consumed"]) for s in saved["loader"]] == [(1, 3)]
    expected_draws, expected_batch = _draws(), next(batches)

    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    restored = TrainState(_loader(sample_shards), rank=0, world_size=1)
    restored.restore(saved)
    assert restored.progress == state.progress and restored.stopped_by is None
    a, b, t = _draws()
    assert (a, b) == expected_draws[:2] and torch.equal(t, expected_draws[2])
    batch = next(restored.epoch_batches())
    assert all(torch.equal(x, y) for x, y in zip(batch.views, expected_batch.views, strict=True))
    assert restored.loader.state_dict()["batches_consumed"] == 4


def test_restore_takes_this_ranks_part_and_ignores_unknown_progress_fields(sample_shards: Path) -> None:
    """Rank 3 of a run resumed on more ranks than saved it takes part 3 % 2; a field a newer version
    added to Progress is ignored."""
    torch.manual_seed(1)
    rank1_rng = TrainState(_loader(sample_shards), rank=0, world_size=1).capture({})["rng"][0]
    torch.manual_seed(0)
    rank0_rng = TrainState(_loader(sample_shards), rank=0, world_size=1).capture({})["rng"][0]
    positions = [{"epoch": 2, "batches_consumed": n, "batch_size": 16, "world_size": 2} for n in (5, 6)]
    saved = {
        "progress": {"step": 11, "epoch": 2, "wandb_run_id": "x", "from_a_newer_version": True},
        "rng": [rank0_rng, rank1_rng],
        "loader": positions,
    }
    state = TrainState(_loader(sample_shards), rank=3, world_size=4)
    state.restore(saved)
    assert state.progress == Progress(step=11, epoch=2, wandb_run_id="x")
    assert state.loader_position == positions[1]
    assert torch.equal(torch.get_rng_state(), rank1_rng["torch"])


def test_progress_advance_counts_steps_and_batches() -> None:
    """Bad steps are not counted here: the loop adds the device's count at its reads (test_step_sync)."""
    progress = Progress(step=4, batches_in_epoch=8, bad_steps=1)
    progress.advance(2)
    assert (progress.step, progress.batches_in_epoch, progress.bad_steps) == (5, 10, 1)
