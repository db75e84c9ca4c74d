"""Reading a rank's part of the shards window by window: indexes parsed per window, remote byte ranges
staged locally ahead of use, and the batch samplers that hand readers `SampleRef`s.

A window (`sampling.RankPart`: a few shards' worth of consecutive samples) is resolved in a background
thread: the `.idx` of each shard it touches is parsed, and for a remote shard the window's byte range of
it is fetched with a few large ranged GETs (`RANGE_BYTES` each, in parallel) into a file under the stage
folder. The next `read_ahead` windows are fetched while the current one is read, so per-request latency
costs no throughput; a window's files are deleted once every reader is done with it (`lag` batches
later). Local shards are read in place (random access on a local disk is cheap). Disk use per rank is
bounded by (1 + read_ahead + lag/window) windows, host memory by the indexes of the windows in flight.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import fsspec
import numpy as np

from pipeline.data.contract import Position
from pipeline.data.sampling import RankPart, batches_per_epoch, epoch_part, piece_ids, stored_order
from pipeline.data.shards import SampleRef, ShardIndex, ShardSet, UnreadableShards, load_shard_set

RANGE_BYTES = 16 << 20  # one ranged GET: object stores recommend 8-16 MB
FETCH_THREADS = 8  # ranged GETs in flight per rank
STORED_WINDOW = 4096  # samples read ahead together in stored order
INDEX_CACHE = 64  # parsed shard indexes kept per rank (a shard shared by consecutive windows is parsed once)


class WindowReader:
    """Turns window pieces into SampleRefs, staging remote ranges; one per rank process (main thread)."""

    def __init__(self, shards: ShardSet, *, stage_dir: str | None, read_ahead: int, lag: int) -> None:
        self.shards, self.read_ahead, self.lag = shards, read_ahead, lag
        self._stage_root = stage_dir
        self._stage: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._fetch_pool: ThreadPoolExecutor | None = None
        self._indexes: OrderedDict[int, ShardIndex] = OrderedDict()
        self._index_lock = threading.Lock()
        self._windows: dict[tuple, Future] = {}
        self._last_use: dict[tuple, int] = {}  # window -> batch counter when it was last handed out
        self._handed_out = 0
        self._staged = 0  # stage files written: their names never repeat

    def __getstate__(self) -> dict:
        raise TypeError("a WindowReader stays in the process that started it")

    def batches(
        self, part: RankPart, ranges: Iterator[tuple[int, int]], *, epoch: int, tag: tuple
    ) -> Iterator[list[SampleRef]]:
        """One list of SampleRefs per (lo, hi) position range of `part`, windows fetched ahead."""
        for key in [k for k in self._windows if k not in self._last_use and k[: len(tag)] != tag]:
            self._drop(key)  # read ahead by an earlier pass that stopped before using it
        for lo, hi in ranges:
            first, last = lo // part.window, (hi - 1) // part.window
            for w in range(first, min(last + self.read_ahead, part.num_windows - 1) + 1):
                self._request((*tag, w), part, w)
            refs: dict[int, SampleRef] = {}
            for w in range(first, last + 1):
                refs.update(self._result((*tag, w)))
                self._last_use[(*tag, w)] = self._handed_out
            batch = [refs[int(i)] for i in part.ids(lo, hi)]
            yield [_with_epoch(r, epoch) for r in batch]
            self._handed_out += 1
            self._release_done()

    def close(self) -> None:
        for pool in (self._pool, self._fetch_pool):
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
        self._pool = self._fetch_pool = None
        self._windows.clear()
        self._last_use.clear()
        if self._stage is not None:
            shutil.rmtree(self._stage, ignore_errors=True)
            self._stage = None

    # -- windows

    def _request(self, key: tuple, part: RankPart, w: int) -> None:
        if key not in self._windows:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max(1, self.read_ahead + 1), thread_name_prefix="window")
                weakref.finalize(
                    self, ThreadPoolExecutor.shutdown, self._pool, wait=False, cancel_futures=True
                )
            ids = np.sort(piece_ids(part.window_pieces(w)))
            self._windows[key] = self._pool.submit(self._resolve, key, ids)

    def _result(self, key: tuple) -> dict[int, SampleRef]:
        return self._windows[key].result()

    def _release_done(self) -> None:
        for key in [k for k, used in self._last_use.items() if self._handed_out - used > self.lag]:
            del self._last_use[key]
            self._drop(key)

    def _drop(self, key: tuple) -> None:
        """Forget a window and delete its staged files."""
        future = self._windows.pop(key)
        if future.exception() is None:
            for path in {ref.path for ref in future.result().values()}:
                if self._stage is not None and path.startswith(self._stage):
                    os.unlink(path)

    def _resolve(self, key: tuple, ids: np.ndarray) -> dict[int, SampleRef]:
        """Sample id -> SampleRef (epoch 0) for the sorted `ids` of one window."""
        starts = self.shards.starts
        shard_of = np.searchsorted(starts, ids, side="right") - 1
        refs: dict[int, SampleRef] = {}
        for shard in np.unique(shard_of):
            shard = int(shard)
            local = ids[shard_of == shard] - starts[shard]
            index = self._index(shard)
            path, base = self.shards.local_path(shard), 0
            if self.shards.is_remote(shard):
                base, end = int(index.extent[local[0], 0]), int(index.extent[local[-1], 1])
                path = self._fetch(shard, base, end)
            url = self.shards.shard_urls[shard]
            for i in local.tolist():
                refs[int(starts[shard]) + i] = SampleRef(
                    sample_id=int(starts[shard]) + i,
                    epoch=0,
                    path=path,
                    base=base,
                    image=(int(index.image[i, 0]), int(index.image[i, 1])),
                    label=(int(index.label[i, 0]), int(index.label[i, 1])),
                    where=f"{url}:{index.keys[i]}",
                )
        return refs

    def _index(self, shard: int) -> ShardIndex:
        with self._index_lock:
            if shard in self._indexes:
                self._indexes.move_to_end(shard)
                return self._indexes[shard]
        try:
            index = self.shards.index(shard)
        except FileNotFoundError as e:
            raise UnreadableShards(
                f"{self.shards.index_urls[shard]} no longer exists; put it back and run the same command "
                "again to resume from the newest checkpoint"
            ) from e
        with self._index_lock:
            self._indexes[shard] = index
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)
        return index

    def _fetch(self, shard: int, start: int, end: int) -> str:
        """Bytes [start, end) of a remote shard into a stage file, in parallel ranged GETs."""
        with self._index_lock:  # windows resolve in parallel: the first to fetch makes the stage folder
            if self._stage is None:
                if self._stage_root:
                    os.makedirs(self._stage_root, exist_ok=True)
                self._stage = tempfile.mkdtemp(prefix="pipeline-stage-", dir=self._stage_root)
                weakref.finalize(self, _remove_stage, self._stage, os.getpid())
                self._fetch_pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="range-get")
        url = self.shards.shard_urls[shard]
        fs, path = fsspec.core.url_to_fs(url)
        with self._index_lock:
            self._staged += 1
            target = os.path.join(self._stage, f"{self._staged:08d}-shard{shard}-{start}-{end}")
        chunks = [(lo, min(end, lo + RANGE_BYTES)) for lo in range(start, end, RANGE_BYTES)]
        try:
            parts = list(self._fetch_pool.map(lambda c: fs.cat_file(path, start=c[0], end=c[1]), chunks))
        except FileNotFoundError as e:
            raise UnreadableShards(
                f"{url} no longer exists; put it back and run the same command again to resume from the "
                "newest checkpoint, or shard into a new folder"
            ) from e
        if sum(len(d) for d in parts) != end - start:
            raise UnreadableShards(
                f"{url}: bytes {start}-{end} came back short; the shard changed under the run"
            )
        with open(target + ".part", "wb") as f:
            for data in parts:
                f.write(data)
        os.replace(target + ".part", target)
        return target


def reader_lag(cfg) -> int:
    """Batches a DataLoader may hand to its workers before they are read: its prefetch, plus one."""
    return max(1, cfg.num_workers) * cfg.prefetch + 2


def _remove_stage(path: str, owner: int) -> None:
    if os.getpid() == owner:  # never from a forked worker
        shutil.rmtree(path, ignore_errors=True)


def _with_epoch(ref: SampleRef, epoch: int) -> SampleRef:
    return ref if ref.epoch == epoch else SampleRef(**{**ref.__dict__, "epoch": epoch})


class EpochBatches:
    """DataLoader batch sampler over this rank's batches of `position`'s epoch, from its position on:
    lists of SampleRef, their windows staged ahead (see `sampling` for the order, this module for reads)."""

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
        reader: WindowReader | None,
    ) -> None:
        self.shards, self.position, self.seed, self.window = shards, position, seed, window
        self.rank, self.batch_size, self.world_size, self.reader = rank, batch_size, world_size, reader

    @classmethod
    def for_rank(
        cls, cfg, split: str, *, rank: int, world_size: int, seed: int, lag: int, read: bool = True
    ) -> EpochBatches:
        """This rank's batches of `split` (position at epoch 0): what every loader starts from. `lag`:
        batches a consumer may still be reading after they were handed out (DataLoader prefetch);
        `read` False: ids only, no reading (a resident split)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        shards = load_shard_set(cfg.train_shards, split)
        position = Position(batches_per_epoch(shards.num_samples, cfg.batch_size, world_size))
        reader = None
        if read:
            reader = WindowReader(shards, stage_dir=cfg.stage_dir, read_ahead=cfg.read_ahead_windows, lag=lag)
        window = max(cfg.shuffle_buffer, cfg.batch_size)
        return cls(shards, position, seed=seed, window=window, rank=rank, batch_size=cfg.batch_size,
                   world_size=world_size, reader=reader)  # fmt: skip

    def part(self) -> RankPart:
        return epoch_part(
            self.shards.shard_sizes,
            self.position.stages,
            seed=self.seed,
            epoch=self.position.epoch,
            window=self.window,
            rank=self.rank,
            world_size=self.world_size,
        )

    def __len__(self) -> int:
        return self.position.batches_per_epoch - self.position.batches_consumed

    def ids(self) -> Iterator[np.ndarray]:
        """The remaining batches of the epoch as sample ids, nothing read."""
        part, first = self.part(), self.position.first_batch
        for b in range(self.position.batches_consumed, self.position.batches_per_epoch):
            yield part.ids((b - first) * self.batch_size, (b - first + 1) * self.batch_size)

    def __iter__(self) -> Iterator[list[SampleRef]]:
        part, first, size = self.part(), self.position.first_batch, self.batch_size
        ranges = (
            ((b - first) * size, (b - first + 1) * size)
            for b in range(self.position.batches_consumed, self.position.batches_per_epoch)
        )
        tag = (self.position.epoch, len(self.position.stages))
        yield from self.reader.batches(part, ranges, epoch=self.position.epoch, tag=tag)


class StoredBatches:
    """Batch sampler over the split in stored order, rank `rank`'s contiguous part of its first `limit`
    samples (all by default), in batches of `batch_size` (the last may be short), windows read ahead;
    for evaluation and the resident decode."""

    def __init__(
        self,
        shards: ShardSet,
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        limit: int | None = None,
        stage_dir: str | None = None,
        lag: int = 4,
    ) -> None:
        total = shards.num_samples if limit is None else min(limit, shards.num_samples)
        self.part = stored_order(total, rank=rank, world_size=world_size, window=STORED_WINDOW)
        self.batch_size = batch_size
        self.reader = WindowReader(shards, stage_dir=stage_dir, read_ahead=1, lag=lag)
        self._passes = 0

    def __len__(self) -> int:
        return -(-self.part.size // self.batch_size)

    def __iter__(self) -> Iterator[list[SampleRef]]:
        self._passes += 1
        size, step = self.part.size, self.batch_size
        ranges = ((lo, min(size, lo + step)) for lo in range(0, size, step))
        yield from self.reader.batches(self.part, ranges, epoch=0, tag=("stored", self._passes))
