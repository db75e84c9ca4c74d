"""Every backend in `BACKENDS` keeps the `TrainLoader` contract on the embedded sample: a backend added
to the registry is tested here without another line."""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from pipeline.data import DataConfig, build_loader
from pipeline.data.contract import TrainLoader
from pipeline.data.loader import BACKENDS

from loader_presets import IDENTITY

BATCH = 48  # 2 ranks x 48 does not divide the 500 samples: 5 batches per rank, 20 samples dropped


def _digest(image: torch.Tensor) -> str:
    return hashlib.sha1((image * 64).round().to(torch.int16).contiguous().numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_backend_keeps_the_loader_contract(sample_val_shards, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    cfg = DataConfig(
        train_shards=str(sample_val_shards),
        backend=backend,
        batch_size=BATCH,
        num_workers=0,
        recipe="multicrop",
        image_size=32,
        local_crops=2,
        local_image_size=16,
        augment=IDENTITY,  # global views are the decoded images: a sample is recognisable across ranks
    )
    formats = [torch.channels_last, torch.contiguous_format]  # rank 0 asks for one, rank 1 the other
    loaders = [build_loader(cfg, rank=r, world_size=2, seed=3, memory_format=formats[r]) for r in range(2)]
    seen: list[set[str]] = []
    for loader, memory_format in zip(loaders, formats, strict=True):
        assert isinstance(loader, TrainLoader)
        batches = list(loader)
        assert len(batches) == len(loader) == 5  # the same on both ranks
        batch = batches[0]
        assert [tuple(v.shape) for v in batch.views] == [(BATCH, 3, 32, 32)] * 2 + [(BATCH, 3, 16, 16)] * 2
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in batch.views)
        assert all(v.is_contiguous(memory_format=memory_format) for v in batch.views)
        assert batch.labels.dtype == torch.int64 and batch.labels.shape == (BATCH,)
        seen.append({_digest(x) for b in batches for x in b.views[0]})
    assert not seen[0] & seen[1]  # each rank reads its own part of the samples

    # Exact resume, mid-way through the second epoch, from a state that went through pickle.
    interrupted = iter(loaders[0])
    next(interrupted), next(interrupted)
    saved = loaders[0].state_dict()
    state = pickle.loads(pickle.dumps(saved))
    expected = next(interrupted)
    assert (state["epoch"], state["batches_consumed"]) == (1, 2)
    resumed = build_loader(cfg, rank=0, world_size=2, seed=3, memory_format=formats[0])
    resumed.load_state_dict(state)
    assert resumed.state_dict() == saved
    got = next(iter(resumed))
    assert torch.equal(got.labels, expected.labels)
    assert all(torch.equal(a, b) for a, b in zip(got.views, expected.views, strict=True))
