"""Staging `.idx` files of `s3://` shards: the ranks of a node stage into one cache at the same time.

Real processes (forked, so they start in milliseconds) released together by a barrier, against the
moto S3 server; each must end with complete indexes and the cache must hold no temporary files.
"""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import fsspec

from pipeline.data.shards import load_shard_set, stage_indexes

RANKS = 8


def _stage(url: str, cache: str, start: mp.synchronize.Barrier, out: mp.Queue) -> None:
    shards = load_shard_set(url, "train")
    start.wait(timeout=60)
    out.put(stage_indexes(shards, cache))


def test_ranks_stage_the_same_indexes_concurrently(s3_server, sample_shards: Path, tmp_path: Path) -> None:
    bucket = s3_server.make_bucket("staging")
    fs = fsspec.filesystem("s3")
    for f in sample_shards.iterdir():
        if f.suffix in (".idx", ".json"):  # the indexes and the manifest are all that staging reads
            fs.put(str(f), f"staging/shards/{f.name}")
    url, cache = f"{bucket}/shards", tmp_path / "idx-cache"
    ctx = mp.get_context("fork")
    start, out = ctx.Barrier(RANKS), ctx.Queue()
    procs = [ctx.Process(target=_stage, args=(url, str(cache), start, out)) for _ in range(RANKS)]
    for p in procs:
        p.start()
    staged = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0] * RANKS
    assert all(paths == staged[0] for paths in staged)  # every rank got the same local paths
    originals = sorted(sample_shards.glob("train-*.idx"))
    assert [Path(p).read_bytes() for p in staged[0]] == [f.read_bytes() for f in originals]
    assert sorted(p.name for p in cache.iterdir()) == sorted(Path(p).name for p in staged[0])  # no temp files
    assert stage_indexes(load_shard_set(url, "train"), str(cache)) == staged[0]
