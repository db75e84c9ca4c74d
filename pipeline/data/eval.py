"""Evaluation data: resize + centre-crop + normalise, every sample once, in stored order."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from pipeline.data.cpu import Collate, ShardSamples
from pipeline.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipeline.data.shards import load_shard_set


class EvalLoader:
    """Yields (images (B, 3, S, S) float32, labels (B,) int64 | None). Rank r reads samples r::world_size,
    so ranks cover the split disjointly and completely (the last batch may be short)."""

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
    ) -> None:
        self.shards = load_shard_set(shards, split)
        self.device = device
        self.ids = list(range(rank, self.shards.num_samples, world_size))
        resize = resize_size or (image_size if image_size <= 64 else round(image_size / 0.875))
        transform = v2.Compose(
            [
                v2.Resize(resize, antialias=True),
                v2.CenterCrop(image_size),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )
        dataset = ShardSamples(self.shards, [transform], seed=0, seeded=False)
        batches = [
            [(i, 0) for i in self.ids[lo : lo + batch_size]] for lo in range(0, len(self.ids), batch_size)
        ]
        self._loader = DataLoader(
            dataset,
            batch_sampler=batches,
            num_workers=num_workers,
            collate_fn=Collate(torch.float32, channels_last=False),
            pin_memory=device.type == "cuda",
        )

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shards.classes

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        for views, labels, _ in self._loader:
            yield (
                views[0].to(self.device, non_blocking=True),
                (None if labels is None else labels.to(self.device, non_blocking=True)),
            )


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
) -> EvalLoader:
    """Eval loader over `shards` (folder/URL with manifest.json). `split` None: the manifest's only split.
    `resize_size` None: the shorter side to image_size / 0.875 (image_size itself at <= 64 px)."""
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
    )
