"""Which of the loader's views a two-view method trains on."""

from __future__ import annotations

import torch


def global_views(views: list[torch.Tensor], method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two views (the global crops; multi-crop's smaller local crops come after them)."""
    if len(views) < 2 or views[0].shape != views[1].shape:
        shapes = [tuple(v.shape) for v in views]
        raise ValueError(f"{method} needs two global views of equal shape first, got {shapes}")
    return views[0], views[1]
