"""Epoch order, rank parts and the loader position: pure functions of (seed, epoch, layout), no data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import sampling
from pipeline.data.contract import Position

SIZES = (250, 250, 250, 100, 37)  # uneven shards
STARTS = np.concatenate([[0], np.cumsum(SIZES)])


def rank_ids(position: Position, *, rank: int, world_size: int, batch_size: int, window: int = 64):
    """The sample ids rank `rank` reads from `position` to the epoch's end, batch by batch."""
    part = sampling.epoch_part(
        SIZES, position.stages, seed=1, epoch=position.epoch, window=window, rank=rank, world_size=world_size
    )
    first = position.first_batch
    return [
        part.ids((b - first) * batch_size, (b - first + 1) * batch_size)
        for b in range(position.batches_consumed, position.batches_per_epoch)
    ]


@pytest.mark.parametrize("window", [1, 64, 10_000])
def test_an_epoch_is_a_seeded_permutation_read_shard_by_shard(window):
    def order(seed, epoch):
        return sampling.epoch_part(SIZES, [], seed=seed, epoch=epoch, window=window, rank=0, world_size=1)

    ids = order(1, 0).ids(0, sum(SIZES))
    assert sorted(ids.tolist()) == list(range(sum(SIZES)))
    assert np.array_equal(ids, order(1, 0).ids(0, sum(SIZES)))
    assert not np.array_equal(ids, order(1, 1).ids(0, sum(SIZES)))
    assert not np.array_equal(ids, order(2, 0).ids(0, sum(SIZES)))
    # each window holds consecutive samples of the shard order: at most two shards per 64-sample window
    shard_of = np.searchsorted(STARTS, ids, side="right") - 1
    for lo in range(0, len(ids), window):
        assert len(np.unique(shard_of[lo : lo + window])) <= (1 if window == 1 else len(SIZES))
    if window == 64:
        assert max(len(np.unique(shard_of[lo : lo + 64])) for lo in range(0, len(ids), 64)) == 2


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_disjoint_equal_contiguous_parts_of_every_epoch(world_size):
    batch_size = 16
    n_batches = sampling.batches_per_epoch(sum(SIZES), batch_size, world_size)
    assert n_batches == sum(SIZES) // (batch_size * world_size)
    position = Position(n_batches)
    per_rank = [
        np.concatenate(rank_ids(position, rank=r, world_size=world_size, batch_size=batch_size))
        for r in range(world_size)
    ]
    assert all(len(ids) == n_batches * batch_size for ids in per_rank)
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)  # disjoint
    assert len(union) > sum(SIZES) - (batch_size + 1) * world_size  # less than a batch per rank dropped
    shards_per_rank = [set((np.searchsorted(STARTS, ids, side="right") - 1).tolist()) for ids in per_rank]
    # cutting the shard sequence into W contiguous parts makes at most S + W - 1 (rank, shard) pieces:
    # each shard is read whole by one rank, except one cut per rank boundary
    assert sum(len(s) for s in shards_per_rank) <= len(SIZES) + world_size - 1


@pytest.mark.parametrize(
    ("old", "new"), [((2, 16), (3, 16)), ((2, 16), (1, 40)), ((4, 8), (2, 8)), ((3, 10), (3, 7))]
)
def test_a_new_layout_finishes_the_epoch_without_repeating_a_sample(old, new):
    """Resumed at another (world size, batch size): the rest of the epoch is the samples no rank had
    reached, split under the new layout; twice in one epoch as well."""
    (w0, b0), (w1, b1) = old, new
    position = Position(sampling.batches_per_epoch(sum(SIZES), b0, w0))
    read_before = [
        ids for r in range(w0) for ids in rank_ids(position, rank=r, world_size=w0, batch_size=b0)[:3]
    ]
    position.batches_consumed = 3
    state = position.state_dict(b0, w0)

    resumed = Position(sampling.batches_per_epoch(sum(SIZES), b1, w1))
    resumed.load_state_dict(state, b1, w1)
    assert resumed.batches_consumed == resumed.first_batch == -(-3 * b0 * w0 // (b1 * w1))
    after = [ids for r in range(w1) for ids in rank_ids(resumed, rank=r, world_size=w1, batch_size=b1)]
    lengths = {len(rank_ids(resumed, rank=r, world_size=w1, batch_size=b1)) for r in range(w1)}
    assert lengths == {resumed.batches_per_epoch - resumed.batches_consumed}  # equal steps on every rank
    seen = np.concatenate(read_before + after)
    assert len(np.unique(seen)) == len(seen)  # no sample twice in the epoch
    assert len(seen) > sum(SIZES) - (max(b0, b1) + 1) * max(w0, w1) * 2

    # a second change in the same epoch, after one more batch under the first
    step = [rank_ids(resumed, rank=r, world_size=w1, batch_size=b1)[0] for r in range(w1)]
    resumed.batches_consumed += 1
    again = Position(sampling.batches_per_epoch(sum(SIZES), b0, w0))
    again.load_state_dict(resumed.state_dict(b1, w1), b0, w0)
    assert len(again.stages) == 2
    more = [ids for r in range(w0) for ids in rank_ids(again, rank=r, world_size=w0, batch_size=b0)]
    seen = np.concatenate(read_before + step + more)
    assert len(np.unique(seen)) == len(seen)


def test_the_same_layout_resumes_the_same_batches():
    position = Position(sampling.batches_per_epoch(sum(SIZES), 16, 2))
    full = rank_ids(position, rank=1, world_size=2, batch_size=16)
    position.batches_consumed = 5
    resumed = Position(position.batches_per_epoch)
    resumed.load_state_dict(position.state_dict(16, 2), 16, 2)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(full[5:], rank_ids(resumed, rank=1, world_size=2, batch_size=16), strict=True)
    )


def test_too_few_samples_for_one_global_batch_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        sampling.batches_per_epoch(100, 64, 2)


def test_sample_seed_depends_on_epoch_and_sample_only():
    assert sampling.sample_seed(0, 1, 5) == sampling.sample_seed(0, 1, 5)
    assert len({sampling.sample_seed(0, e, i) for e in range(3) for i in range(100)}) == 300


def test_position_epochs_and_resume():
    pos = Position(batches_per_epoch=4)
    pos.start_iter()
    for _ in range(4):
        pos.consumed_one()
    pos.start_iter()  # a finished epoch without set_epoch: the next iteration is epoch 1
    assert (pos.epoch, pos.batches_consumed) == (1, 0)
    pos.consumed_one()
    pos.set_epoch(1)  # the same epoch keeps its position (a resumed trainer calls set_epoch(saved))
    assert pos.batches_consumed == 1
    pos.set_epoch(2)
    assert (pos.epoch, pos.batches_consumed) == (2, 0)

    pos.consumed_one()
    state = pos.state_dict(batch_size=8, world_size=2)
    assert state["samples_consumed"] == 16
    other = Position(batches_per_epoch=8)  # resumed at another world size: count global samples, round up
    other.load_state_dict(state, batch_size=4, world_size=3)
    assert (other.epoch, other.batches_consumed, other.first_batch) == (2, 2, 2)
    assert other.state_dict(4, 3)["samples_consumed"] == 16  # nothing read yet in the new stage
    other.set_epoch(3)
    assert (other.stages, other.first_batch) == ([], 0)  # a new epoch starts with one stage
