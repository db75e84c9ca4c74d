"""The torch backend's next batch is prepared one ahead of the step (on a side CUDA stream on a GPU):
the same batches as producing each one when asked, and batch n+1 issued before step n ends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.data import Batch, DataConfig, build_loader
from pipeline.data.device_prefetch import on_side_stream
from pipeline.data.torch_loader import batch_rng


def _cfg(shards: Path, source: str) -> DataConfig:
    return DataConfig(
        train_shards=str(shards), image_size=32, num_workers=0, batch_size=50, backend="torch",
        recipe="simclr", source=source,
    )  # fmt: skip


def _same(a: Batch, b: Batch) -> bool:
    return torch.equal(a.labels, b.labels) and all(
        torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True)
    )


def _without_overlap(loader, epoch: int) -> list[Batch]:
    """Each batch produced when asked, as the loader did before the prefetch: its pixels, then its views."""
    loader.set_epoch(epoch)
    loader.position.start_iter()
    return [
        Batch(loader.augment(images, sizes, batch_rng(loader.seed, epoch, n, loader.rank)), labels)
        for n, (images, sizes, labels) in enumerate(loader._pixels())
    ]


@pytest.mark.parametrize("source", ["resident", "stream"])
def test_identical_batches_with_and_without_the_overlap(sample_val_shards: Path, source: str) -> None:
    """A step between batches (a forward on the views) changes nothing: same pixels, same order, and
    the loader's position counts only the batches handed over."""
    cfg = _cfg(sample_val_shards, source)
    reference = _without_overlap(build_loader(cfg, seed=5), epoch=1)
    loader = build_loader(cfg, seed=5)
    loader.set_epoch(1)
    conv = torch.nn.Conv2d(3, 4, 3)
    got = []
    for n, batch in enumerate(loader):
        assert loader.state_dict()["batches_consumed"] == n + 1  # the one ahead is not counted
        conv(batch.views[0]).sum().backward()  # the step
        got.append(batch)
    assert len(got) == len(reference) == 10
    assert all(_same(a, b) for a, b in zip(reference, got, strict=True))


def test_batch_n_plus_1_is_issued_before_step_n_ends() -> None:
    """The producer runs one batch ahead: batch n+1's work is issued before step n starts, so on a GPU
    its kernels (on the side stream) run while step n's do."""
    log: list[str] = []

    def batches() -> Iterator[Batch]:
        for n in range(4):
            log.append(f"issue {n}")
            yield Batch([torch.full((2, 3, 4, 4), float(n))], torch.tensor([n, n]))

    seen = []
    for n, batch in enumerate(on_side_stream(batches(), torch.device("cpu"))):
        log.append(f"step {n} starts")
        seen.append(int(batch.labels[0]))
        log.append(f"step {n} ends")
    assert seen == [0, 1, 2, 3]
    for n in range(3):
        assert log.index(f"issue {n + 1}") < log.index(f"step {n} ends"), log
        assert log.index(f"issue {n}") < log.index(f"step {n} starts"), log
    assert log[:3] == ["issue 0", "issue 1", "step 0 starts"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["resident", "stream"])
def test_the_side_stream_hands_over_the_same_pixels_on_the_gpu(sample_val_shards: Path, source: str) -> None:
    """On CUDA the views come from a side stream while a long matmul occupies the training stream: the
    handoff (wait on the batch's event, record_stream) gives the pixels of the stream-free path."""
    cfg = _cfg(sample_val_shards, source)
    reference = _without_overlap(build_loader(cfg, seed=5, device="cuda"), epoch=0)
    loader = build_loader(cfg, seed=5, device="cuda")
    loader.set_epoch(0)
    busy = torch.randn(4096, 4096, device="cuda")
    got = []
    for batch in loader:
        for _ in range(4):
            busy = busy @ busy / 64  # the step, long enough for the next batch to overlap it
        got.append(Batch([v.clone() for v in batch.views], batch.labels.clone()))
    torch.cuda.synchronize()
    assert all(_same(a, b) for a, b in zip(reference, got, strict=True)) and len(got) == 10
