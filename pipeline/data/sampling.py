"""Which samples each rank gets, in which order, each epoch — a pure function of (seed, epoch).

Order: shards in a seeded random order, then samples shuffled within windows of `window` consecutive
samples (a full permutation when `window` >= N). Windows keep reads local to a few shards at a time
(object storage) while mixing samples across shard boundaries.

Split: the epoch order is cut into global batches of `batch_size * world_size`; rank r takes slice
[r * batch_size, (r + 1) * batch_size) of each. Every rank gets exactly `N // (batch_size * world_size)`
batches (the remainder, a different set each epoch, is dropped), so no rank waits at the epoch end, and
a position counted in global batches means the same samples at any world size.

`EpochBatches` applies this as a DataLoader batch sampler, from a `Position` in the epoch on.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.contract import Position
from pipeline.data.shards import ShardSet, load_shard_set
from pipeline.schema import ConfigError

if TYPE_CHECKING:
    from pipeline.data.config import DataConfig


def epoch_order(shard_sizes: tuple[int, ...], *, seed: int, epoch: int, window: int) -> np.ndarray:
    """(N,) int64 sample ids in this epoch's order."""
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(shard_sizes)[:-1]])
    ids = np.concatenate(
        [np.arange(starts[s], starts[s] + shard_sizes[s]) for s in rng.permutation(len(shard_sizes))]
    )
    for lo in range(0, len(ids), window):
        ids[lo : lo + window] = rng.permutation(ids[lo : lo + window])
    return ids.astype(np.int64)


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    n = num_samples // (batch_size * world_size)
    if n < 1:
        raise ConfigError(
            f"data.batch_size {batch_size} x world size {world_size} exceeds the {num_samples} samples"
        )
    return n


def rank_batch(order: np.ndarray, batch: int, *, rank: int, batch_size: int, world_size: int) -> np.ndarray:
    """(batch_size,) sample ids of this rank's `batch`-th batch of the epoch."""
    start = batch * batch_size * world_size + rank * batch_size
    return order[start : start + batch_size]


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of rank, worker and world size."""
    return int(
        np.random.SeedSequence([seed, epoch, sample_id]).generate_state(2, np.uint32).view(np.uint64)[0]
    )


class EpochBatches:
    """DataLoader batch sampler over this rank's batches of `position`'s epoch, from its position on."""

    def __init__(
        self,
        shards: ShardSet,
        position: Position,
        *,
        seed: int,
        window: int,
        rank: int,
        batch_size: int,
        world_size: int,
    ) -> None:
        self.shards, self.position, self.seed, self.window = shards, position, seed, window
        self.rank, self.batch_size, self.world_size = rank, batch_size, world_size

    @classmethod
    def for_rank(cls, cfg: DataConfig, split: str, *, rank: int, world_size: int, seed: int) -> EpochBatches:
        """This rank's batches of `split` (shards loaded, position at epoch 0): what every loader that
        shards by sample id (cpu, torch) starts from."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        shards = load_shard_set(cfg.train_shards, split)
        position = Position(batches_per_epoch(shards.num_samples, cfg.batch_size, world_size))
        return cls(
            shards,
            position,
            seed=seed,
            window=cfg.shuffle_buffer,
            rank=rank,
            batch_size=cfg.batch_size,
            world_size=world_size,
        )

    def __len__(self) -> int:
        return self.position.batches_per_epoch - self.position.batches_consumed

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.position.epoch, self.position.batches_consumed
        order = epoch_order(self.shards.shard_sizes, seed=self.seed, epoch=epoch, window=self.window)
        for b in range(start, self.position.batches_per_epoch):
            ids = rank_batch(order, b, rank=self.rank, batch_size=self.batch_size, world_size=self.world_size)
            yield [(int(i), epoch) for i in ids]
