"""Epoch order, rank slices and the loader position: pure functions of (seed, epoch), no data needed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import ConfigError
from pipeline.data import sampling
from pipeline.data.contract import Position

SIZES = (250, 250, 250, 100, 37)  # uneven shards


@pytest.mark.parametrize("window", [1, 64, 10_000])
def test_epoch_order_is_a_seeded_permutation(window):
    order = sampling.epoch_order(SIZES, seed=1, epoch=0, window=window)
    assert sorted(order.tolist()) == list(range(sum(SIZES)))
    assert np.array_equal(order, sampling.epoch_order(SIZES, seed=1, epoch=0, window=window))
    assert not np.array_equal(order, sampling.epoch_order(SIZES, seed=1, epoch=1, window=window))
    assert not np.array_equal(order, sampling.epoch_order(SIZES, seed=2, epoch=0, window=window))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ranks_get_disjoint_equal_slices_of_every_epoch(world_size):
    batch_size = 16
    n_batches = sampling.batches_per_epoch(sum(SIZES), batch_size, world_size)
    assert n_batches == sum(SIZES) // (batch_size * world_size)
    order = sampling.epoch_order(SIZES, seed=0, epoch=3, window=100)
    per_rank = [
        np.concatenate(
            [
                sampling.rank_batch(order, b, rank=r, batch_size=batch_size, world_size=world_size)
                for b in range(n_batches)
            ]
        )
        for r in range(world_size)
    ]
    assert all(len(ids) == n_batches * batch_size for ids in per_rank)
    union = np.concatenate(per_rank)
    assert len(np.unique(union)) == len(union)  # disjoint
    assert len(union) > sum(SIZES) - batch_size * world_size  # at most one global batch dropped


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
    assert (other.epoch, other.batches_consumed) == (2, 2)
