"""How a method reads the loader's views: global crops first, multi-crop's smaller local crops after.

Multi-crop (SwAV, DINO) adds cheap low-resolution crops as extra positives. Every method trains on all
crops, with targets (keys, momentum projections) taken from the global crops only: a local crop sees
too little of the image to be a good target, and the global pairs give the two-view losses exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def split_crops(views: list[torch.Tensor], method: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(global crops, local crops): the leading views sharing the first one's shape (at least two),
    then the rest, which must share one smaller shape."""
    shapes = [tuple(v.shape) for v in views]
    num_global = next((i for i, s in enumerate(shapes) if s != shapes[0]), len(shapes))
    if num_global < 2:
        raise ValueError(f"{method} needs two global views of equal shape first, got {shapes}")
    if len(set(shapes[num_global:])) > 1:
        raise ValueError(f"{method}: local crops must share one shape after the global ones, got {shapes}")
    return views[:num_global], views[num_global:]


def encode(net: Callable[[torch.Tensor], torch.Tensor], *groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """`net` over each group of crops (one resolution each) in one pass, so BatchNorm normalises over
    the whole group; the outputs come back one per crop, in order."""
    return [out for crops in groups if crops for out in net(torch.cat(crops)).chunk(len(crops))]


def crop_pairs(num_global: int, num_crops: int, *, symmetric_loss: bool = False) -> list[tuple[int, int]]:
    """(i, j): crop i is trained towards the target of global crop j, i != j.

    Two crops give (1, 0) and (0, 1), the two-view methods' symmetric pair. For a loss symmetric in its
    arguments each unordered pair is kept once (two crops: just (1, 0)).
    """
    pairs = [(i, j) for j in range(num_global) for i in range(num_crops) if i != j]
    return [(i, j) for i, j in pairs if i > j] if symmetric_loss else pairs
