"""Which samples each rank gets, in which order, each epoch: a pure function of (seed, epoch, layout).

Order: the shards in a seeded random order, laid end to end. Split: rank r of W takes the contiguous
part [r*T/W, (r+1)*T/W) of that sequence, so it owns whole shards (a shard at a boundary is shared as
two byte ranges) and every byte is read by one rank, once. Shuffle: a rank's part is cut into windows of
`window` consecutive samples (a few shards: what one read-ahead fetches), each permuted. Batches: rank r's
batch b is samples [b*B, (b+1)*B) of its shuffled part. Every rank takes `N // (B * W)` batches (the
rest, a different set each epoch, is dropped), so no rank waits at the epoch end.

Layout changes: a resume at another batch size or world size finishes the interrupted epoch with the
samples no rank had reached (a new *stage* of the epoch: the remaining samples, in the old ranks' order,
split again and re-windowed), so no sample is repeated and none but the usual remainder skipped. The
position records the stages (`contract.Position`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.schema import ConfigError

Piece = tuple[int, int] | np.ndarray  # a run of sample ids [a, b), or explicit ids


@dataclass(frozen=True)
class Stage:
    """A layout an epoch was read under, from batch `first_batch` (in its units) to `batches_consumed`."""

    world_size: int
    batch_size: int
    first_batch: int
    batches_consumed: int


def _length(piece: Piece) -> int:
    return piece[1] - piece[0] if isinstance(piece, tuple) else len(piece)


def piece_ids(pieces: list[Piece]) -> np.ndarray:
    """The sample ids `pieces` spell, in order."""
    runs = [np.arange(p[0], p[1]) if isinstance(p, tuple) else p for p in pieces]
    return np.concatenate(runs).astype(np.int64) if runs else np.zeros(0, np.int64)


def take(pieces: list[Piece], lo: int, hi: int, ends: np.ndarray | None = None) -> list[Piece]:
    """Positions [lo, hi) of the sequence `pieces` spell, as pieces (runs stay runs); `ends`, the
    pieces' cumulative lengths, makes it O(log pieces + pieces taken)."""
    if ends is None:
        ends = np.cumsum([_length(p) for p in pieces])
    out = []
    for k in range(int(np.searchsorted(ends, lo, side="right")), len(pieces)):
        piece = pieces[k]
        at = int(ends[k]) - _length(piece)
        if at >= hi:
            break
        a, b = max(lo - at, 0), min(hi - at, _length(piece))
        if a < b:
            out.append((piece[0] + a, piece[0] + b) if isinstance(piece, tuple) else piece[a:b])
    return out


def shard_sequence(shard_sizes: tuple[int, ...], *, seed: int, epoch: int) -> list[Piece]:
    """Every sample once: the shards in this epoch's seeded order, each a run of ids."""
    starts = np.concatenate([[0], np.cumsum(shard_sizes)])
    perm = np.random.default_rng([seed, epoch]).permutation(len(shard_sizes))
    return [(int(starts[s]), int(starts[s + 1])) for s in perm if shard_sizes[s]]


class RankPart:
    """Rank `rank`'s part of `sequence` under `world_size` ranks, shuffled window by window."""

    def __init__(
        self,
        sequence: list[Piece],
        *,
        rank: int,
        world_size: int,
        window: int,
        key: list[int],
        shuffle: bool = True,
    ) -> None:
        total = sum(_length(p) for p in sequence)
        lo, hi = rank * total // world_size, (rank + 1) * total // world_size
        self.pieces, self.size, self.window, self.key = take(sequence, lo, hi), hi - lo, window, [*key, rank]
        self._ends = np.cumsum([_length(p) for p in self.pieces])
        self.shuffle = shuffle
        self._cached: tuple[int, np.ndarray] | None = None

    @property
    def num_windows(self) -> int:
        return -(-self.size // self.window)

    def window_pieces(self, w: int) -> list[Piece]:
        return take(self.pieces, w * self.window, min(self.size, (w + 1) * self.window), self._ends)

    def window_ids(self, w: int) -> np.ndarray:
        """Window w's sample ids in their shuffled order."""
        if self._cached is None or self._cached[0] != w:
            ids = piece_ids(self.window_pieces(w))
            if self.shuffle:
                ids = ids[np.random.default_rng([*self.key, w]).permutation(len(ids))]
            self._cached = (w, ids)
        return self._cached[1]

    def ids(self, lo: int, hi: int) -> np.ndarray:
        """Positions [lo, hi) of the shuffled part."""
        parts = []
        for w in range(lo // self.window, -(-hi // self.window)):
            a = max(lo - w * self.window, 0)
            parts.append(self.window_ids(w)[a : hi - w * self.window])
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def remaining(self, consumed: int) -> list[Piece]:
        """What follows the first `consumed` positions: the rest of their window (shuffled, as ids),
        then the untouched windows as they were."""
        w = consumed // self.window
        if w >= self.num_windows:
            return []
        head = self.window_ids(w)[consumed - w * self.window :]
        return ([head] if len(head) else []) + take(self.pieces, (w + 1) * self.window, self.size, self._ends)


def epoch_part(
    shard_sizes: tuple[int, ...],
    stages: list[Stage],
    *,
    seed: int,
    epoch: int,
    window: int,
    rank: int,
    world_size: int,
) -> RankPart:
    """This rank's part of the current stage of `epoch`, after the earlier `stages` of it."""
    sequence = shard_sequence(shard_sizes, seed=seed, epoch=epoch)
    for n, stage in enumerate(stages):
        parts = [
            RankPart(sequence, rank=r, world_size=stage.world_size, window=window, key=[seed, epoch, n])
            for r in range(stage.world_size)
        ]
        done = (stage.batches_consumed - stage.first_batch) * stage.batch_size
        sequence = [piece for part in parts for piece in part.remaining(done)]
    return RankPart(sequence, rank=rank, world_size=world_size, window=window, key=[seed, epoch, len(stages)])


def batches_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    n = num_samples // (batch_size * world_size)
    if n < 1:
        raise ConfigError(
            f"data.batch_size {batch_size} x world size {world_size} exceeds the {num_samples} samples"
        )
    return n


def sample_seed(seed: int, epoch: int, sample_id: int) -> int:
    """Augmentation seed of one sample in one epoch: independent of rank, worker and world size."""
    return int(
        np.random.SeedSequence([seed, epoch, sample_id]).generate_state(2, np.uint32).view(np.uint64)[0]
    )


def stored_order(num_samples: int, *, rank: int, world_size: int, window: int) -> RankPart:
    """Rank `rank`'s contiguous part of the split in stored order (evaluation, resident decode)."""
    return RankPart(
        [(0, num_samples)], rank=rank, world_size=world_size, window=window, key=[], shuffle=False
    )
