"""Evaluation data: resize + centre-crop + normalise, every sample once, in stored order.

Two paths with the same geometry: torchvision in DataLoader workers, or (`resident_budget_gib`) the
split decoded once into device memory and kept there for every later call in this process, e.g. the
online kNN monitor's bank and queries each epoch, then resized on the device in batches.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pipeline.data.batch_augment import resize_weights, separable
from pipeline.data.reading import StoredBatches
from pipeline.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.resident import OverBudget, ResidentImages, decode_resident
from pipeline.data.samples import Collate, ShardSamples
from pipeline.data.shards import load_shard_set

log = logging.getLogger(__name__)
RESIDENT_SPLITS = 2  # decoded splits kept per process: the kNN monitor's bank and queries


@functools.lru_cache(maxsize=RESIDENT_SPLITS)
def _resident_split(
    root: str, split: str, device: str, budget_bytes: int, num_workers: int
) -> ResidentImages | None:
    try:
        shards = load_shard_set(root, split)
        return decode_resident(
            shards, device=torch.device(device), budget_bytes=budget_bytes, num_workers=num_workers
        )
    except OverBudget as e:
        log.warning("%s; evaluating from the shards instead", e)
        return None


class EvalLoader:
    """Yields (images (B, 3, S, S) float32, labels (B,) int64 | None). Rank r reads the contiguous part
    [r*N/W, (r+1)*N/W) of the split in stored order (whole shards, read ahead window by window), so ranks
    cover the split disjointly and completely, and their parts end to end are the stored order (the
    last batch may be short)."""

    def __init__(
        self,
        shards: str,
        *,
        image_size: int,
        batch_size: int,
        split: str | None,
        num_workers: int,
        rank: int,
        world_size: int,
        device: torch.device,
        resize_size: int | None,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        resident_budget_gib: float | None = None,
        limit: int | None = None,
    ) -> None:
        self.shards = load_shard_set(shards, split)
        self.device = device
        lag = 2 * max(1, num_workers) + 2  # the DataLoader's prefetch
        self.batches = StoredBatches(
            self.shards, batch_size, rank=rank, world_size=world_size, limit=limit, lag=lag
        )
        self.batch_size, self.image_size, self.mean, self.std = batch_size, image_size, mean, std
        resize = resize_size or (image_size if image_size <= 64 else round(image_size / 0.875))
        self.resize = resize
        self.resident = None
        if resident_budget_gib is not None:
            budget = int(resident_budget_gib * 2**30)
            args = (self.shards.root, self.shards.split, str(device), budget, num_workers)
            self.resident = _resident_split(*args)
        transform = v2.Compose(
            [
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
        dataset = ShardSamples(self.shards, [transform], seed=0, seeded=False)
        self._loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            num_workers=num_workers,
            collate_fn=Collate(torch.float32, torch.contiguous_format),
            pin_memory=device.type == "cuda",
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shards.classes

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        if self.resident is not None:
            yield from self._resident_batches()
            return
        for views, labels, _ in self._loader:
            yield (
                views[0].to(self.device, non_blocking=True),
                (None if labels is None else labels.to(self.device, non_blocking=True)),
            )

    def _resident_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        part = self.batches.part
        for lo in range(0, part.size, self.batch_size):
            ids = torch.from_numpy(part.ids(lo, min(part.size, lo + self.batch_size)))
            images, sizes, labels = self.resident.gather(ids)
            # Resize the shorter side to `resize`, centre-crop `image_size`: a centred square of the source.
            side = sizes.min(1).values.float() * self.image_size / self.resize
            top, left = ((sizes.float() - side[:, None]) / 2).unbind(1)
            no_flip = torch.zeros(len(ids), dtype=torch.bool)
            rows = resize_weights(top, side, no_flip, self.image_size, images.shape[2]).to(self.device)
            cols = resize_weights(left, side, no_flip, self.image_size, images.shape[3]).to(self.device)
            pixels = separable(images.float(), rows / 255, cols)
            yield (pixels - mean) / std, labels


def build_eval_loader(
    shards: str,
    *,
    image_size: int,
    batch_size: int,
    split: str | None = None,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    resize_size: int | None = None,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    resident_budget_gib: float | None = None,
    limit: int | None = None,
) -> EvalLoader:
    """Eval loader over `shards` (folder/URL with manifest.json). `split` None: the manifest's only split.
    `resize_size` None: the shorter side to image_size / 0.875 (image_size itself at <= 64 px).
    `resident_budget_gib`: decode the split once into `device` memory when it fits (kept for later calls
    in this process; the torch backend's path), else read the shards each time. `limit`: only the first
    `limit` samples of the split (stored order), split among the ranks."""
    return EvalLoader(
        shards,
        image_size=image_size,
        batch_size=batch_size,
        split=split,
        num_workers=num_workers,
        rank=rank,
        world_size=world_size,
        device=torch.device(device),
        resize_size=resize_size,
        mean=mean,
        std=std,
        resident_budget_gib=resident_budget_gib,
        limit=limit,
    )
