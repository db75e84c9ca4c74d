"""CPU backend on the real sample shards: views, labels, rank split, exact resume, damaged samples."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

import pytest
import torch

from pipeline.data import DataConfig, build_eval_loader, build_loader
from pipeline.data.shards import load_shard_set

from loader_presets import IDENTITY, damaged_first_shard, take_batches


def _cfg(shards, **kw) -> DataConfig:
    return DataConfig(
        train_shards=str(shards), **{"image_size": 32, "num_workers": 0, "batch_size": 50, **kw}
    )


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def _truth(shards) -> dict[str, int]:
    """Image digest -> label for every sample, from the eval loader (stored order, no augmentation)."""
    out = {}
    for images, labels in build_eval_loader(str(shards), image_size=32, batch_size=500):
        out.update({_digest(x): int(y) for x, y in zip(images, labels, strict=True)})
    return out


def test_two_ranks_cover_an_epoch_disjointly_with_labels(sample_val_shards):
    truth = _truth(sample_val_shards)
    seen = []
    for rank in range(2):
        loader = build_loader(
            _cfg(sample_val_shards, augment=IDENTITY, batch_size=50), rank=rank, world_size=2
        )
        assert len(loader) == 5
        rank_seen = []
        for batch in loader:
            for image, label in zip(batch.views[0], batch.labels, strict=True):
                key = _digest(image)
                assert truth[key] == int(label)  # the image's own label came with it
                rank_seen.append(key)
        seen.append(rank_seen)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(truth)  # 2 x 5 x 50 = all 500 samples, once each


def test_uneven_shards_give_every_rank_the_same_number_of_batches(sample_val_shards):
    # 2 shards of 250 over 3 ranks: sample-level split, 500 // (3 * 32) = 5 batches on every rank
    counts = [
        sum(
            1
            for _ in build_loader(
                _cfg(sample_val_shards, batch_size=32, augment=IDENTITY), rank=r, world_size=3
            )
        )
        for r in range(3)
    ]
    assert counts == [5, 5, 5]


def test_restored_loader_yields_bit_identical_batches(sample_val_shards):
    cfg = _cfg(sample_val_shards, recipe="byol")  # 500 samples: 10 batches per epoch
    reference = take_batches(build_loader(cfg, seed=7), range(2), stop_after=13)

    interrupted = build_loader(cfg, seed=7)
    take_batches(interrupted, range(2), stop_after=7)
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint keeps
    assert (state["epoch"], state["batches_consumed"], state["samples_consumed"]) == (0, 7, 350)

    resumed = build_loader(_cfg(sample_val_shards, recipe="byol", num_workers=1), seed=7)
    resumed.load_state_dict(state)
    got = take_batches(resumed, range(state["epoch"], 2), stop_after=6)  # worker count must not matter
    for ref, new in zip(reference[7:], got, strict=True):
        assert torch.equal(ref.labels, new.labels)
        assert all(torch.equal(a, b) for a, b in zip(ref.views, new.views, strict=True))
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["batches_consumed"] == 3
    assert not torch.equal(reference[0].views[0], reference[10].views[0])  # epochs differ


def test_damaged_sample_is_skipped_and_counted(sample_shards, tmp_path, caplog):
    shard_name, _ = damaged_first_shard(sample_shards, tmp_path)

    loader = build_loader(_cfg(tmp_path, augment=IDENTITY))
    with caplog.at_level(logging.WARNING, logger="pipeline.data.samples"):
        batches = list(loader)
    assert len(batches) == 5 and all(b.views[0].shape[0] == 50 for b in batches)
    assert loader.state_dict()["replaced_samples"] == 1
    assert f"{shard_name}:" in caplog.text and "data_prep verify" in caplog.text


def test_eval_loader_reads_every_sample_once_in_order(sample_val_shards):
    shards = load_shard_set(str(sample_val_shards))
    loader = build_eval_loader(str(sample_val_shards), image_size=32, batch_size=64)
    labels = torch.cat([y for x, y in loader])
    assert len(loader) == 8 and labels.tolist() == [int(c) for c in _stored_labels(shards)]
    halves = [
        build_eval_loader(str(sample_val_shards), image_size=32, batch_size=64, rank=r, world_size=2)
        for r in range(2)
    ]
    assert [sum(x.shape[0] for x, _ in h) for h in halves] == [250, 250]
    images, _ = next(
        iter(build_eval_loader(str(sample_val_shards), image_size=24, batch_size=4, resize_size=28))
    )
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32


def _stored_labels(shards):
    """Every `.cls` label in stored order, read straight from the tars by their indexes."""
    import fsspec

    labels = []
    for shard, url in enumerate(shards.shard_urls):
        with fsspec.open(url, "rb") as f:
            for offset, size in shards.index(shard).label.tolist():
                f.seek(offset)
                labels.append(int(f.read(size)))
    return labels


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_arrive_on_the_gpu(sample_shards):
    batch = next(iter(build_loader(_cfg(sample_shards, num_workers=1), device="cuda")))
    assert all(v.is_cuda for v in batch.views) and batch.labels.is_cuda


def test_shards_stream_from_s3(sample_val_shards, s3_server):
    bucket = s3_server.make_bucket("c-loader")
    s3_server.filesystem().put(str(sample_val_shards), f"{bucket}/val", recursive=True)
    url = f"{bucket}/val"
    loader = build_loader(_cfg(url, augment=IDENTITY, batch_size=100, num_workers=1))  # reads in a worker
    labels = torch.cat([b.labels for b in loader])
    assert len(labels) == 500 and sorted(labels.tolist()) == sorted(_stored_labels(load_shard_set(url)))
    images, _ = next(iter(build_eval_loader(url, image_size=32, batch_size=10)))
    local, _ = next(iter(build_eval_loader(str(sample_val_shards), image_size=32, batch_size=10)))
    assert torch.equal(images, local)


def _worker_sleeping(ready) -> None:
    from pipeline.data.samples import init_worker

    init_worker(0)
    ready.set()
    time.sleep(60)


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_a_worker_ignores_others_sigterm_and_obeys_its_trainers(start_method):
    """A scheduler's SIGTERM to the whole job must not end a worker before the trainer saves; the
    trainer's own (multiprocessing ends daemonic workers so at exit) must, or the exit waits forever."""
    import multiprocessing
    import signal
    import subprocess

    ctx = multiprocessing.get_context(start_method)
    ready = ctx.Event()
    worker = ctx.Process(target=_worker_sleeping, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)  # sent by another process
        worker.join(2)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from the parent
        worker.join(10)
        assert not worker.is_alive() and worker.exitcode == 0
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)


NO_FREE_DESCRIPTOR = """
import os, resource, sys
import torch
from pipeline.data.reading import StoredBatches
from pipeline.data.samples import ShardSamples
from pipeline.data.shards import load_shard_set

shards = load_shard_set(sys.argv[1])
dataset = ShardSamples(shards, [torch.nn.Identity()], seed=0, seeded=False)
first = next(iter(StoredBatches(shards, 1)))[0]
open_now = len(os.listdir("/proc/self/fd")) - 1  # less the one listdir held
resource.setrlimit(resource.RLIMIT_NOFILE, (open_now, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:
    dataset[first]
except OSError as e:
    print(e)
"""


@pytest.mark.slow  # a fresh interpreter importing torch
def test_running_out_of_file_descriptors_is_an_error_not_damaged_samples(sample_val_shards):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", NO_FREE_DESCRIPTOR, str(sample_val_shards)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Too many open files reading" in proc.stdout and "ulimit -n" in proc.stdout
    assert "skipping" not in proc.stderr
