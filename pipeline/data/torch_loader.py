"""`torch` backend: batched per-sample augmentation on the training device, the same code on CPU and GPU.

Pixels come from a resident corpus (decoded once into device memory, batches gathered by index) or are
streamed from the shards batch by batch (`data.source`: `auto` keeps the split resident when it fits
`data.resident_budget_gib`, and streams otherwise). The epoch order and rank split are the CPU
backend's (`reading.EpochBatches`: a pure function of seed, epoch and layout), and each batch's
augmentation is drawn from a generator seeded by (seed, epoch, batch, rank), so a restored loader
yields bit-identical batches to an uninterrupted one, whichever source feeds it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from pipeline.data.batch_augment import BatchAugment
from pipeline.data.config import DataConfig
from pipeline.data.contract import Batch
from pipeline.data.reading import EpochBatches, reader_lag
from pipeline.data.recipes import resolve_views
from pipeline.data.resident import OverBudget, ResidentImages, decode_resident
from pipeline.data.streaming import StreamingSource

log = logging.getLogger(__name__)


def batch_rng(seed: int, epoch: int, batch: int, rank: int) -> np.random.Generator:
    """The generator every random parameter of one rank's batch is drawn from."""
    return np.random.default_rng([seed, epoch, batch, rank])


class TorchLoader:
    """Training loader of the `torch` backend (see the module docstring for the determinism contract)."""

    def __init__(
        self,
        cfg: DataConfig,
        *,
        split: str,
        rank: int,
        world_size: int,
        seed: int,
        device: torch.device,
        memory_format: torch.memory_format,
    ) -> None:
        self._batches = EpochBatches.for_rank(
            cfg, split, rank=rank, world_size=world_size, seed=seed, lag=reader_lag(cfg)
        )
        self.cfg, self.rank, self.world_size, self.seed, self.device = cfg, rank, world_size, seed, device
        self.shards, self.position = self._batches.shards, self._batches.position
        self.views = resolve_views(cfg)
        self.augment = BatchAugment(
            self.views,
            dtype=torch.float16 if cfg.dtype == "float16" else torch.float32,
            memory_format=memory_format,
        )
        self.resident = self._resident()
        self.stream = None
        if self.resident is None:
            self.stream = StreamingSource(
                self.shards, self._batches, device=device, num_workers=cfg.num_workers, prefetch=cfg.prefetch
            )
        self.replaced_samples = 0 if self.resident is None else self.resident.replaced_samples

    def _resident(self) -> ResidentImages | None:
        if self.cfg.source == "stream":
            return None
        budget = int(self.cfg.resident_budget_gib * 2**30)
        try:
            return decode_resident(
                self.shards, device=self.device, budget_bytes=budget, num_workers=self.cfg.num_workers
            )
        except OverBudget as e:
            if self.cfg.source == "resident":
                raise
            log.warning("%s; streaming instead (data.source=auto)", e)
            return None

    def __len__(self) -> int:
        return self.position.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.position.set_epoch(epoch)

    def _pixels(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        if self.resident is not None:
            for ids in self._batches.ids():
                yield self.resident.gather(torch.from_numpy(ids))
            return
        for images, sizes, labels, replaced in self.stream:
            self.replaced_samples += replaced
            yield images, sizes, labels

    def __iter__(self) -> Iterator[Batch]:
        from pipeline.data.device_prefetch import on_side_stream

        self.position.start_iter()
        epoch, first = self.position.epoch, self.position.batches_consumed

        def augmented() -> Iterator[Batch]:  # one batch ahead of the step: n is drawn from its own index
            for n, (images, sizes, labels) in enumerate(self._pixels(), start=first):
                yield Batch(self.augment(images, sizes, batch_rng(self.seed, epoch, n, self.rank)), labels)

        for batch in on_side_stream(augmented(), self.device):
            self.position.consumed_one()  # counted when handed over, so a checkpoint never skips one
            yield batch

    def state_dict(self) -> dict[str, Any]:
        state = self.position.state_dict(self.cfg.batch_size, self.world_size)
        return {**state, "backend": "torch", "replaced_samples": self.replaced_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position.load_state_dict(state, self.cfg.batch_size, self.world_size)
        self.replaced_samples = int(state.get("replaced_samples", self.replaced_samples))
