"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of the two views' projections to
the identity. The correlation is over the global batch: embeddings are gathered with gradients, every
rank computes the same loss, and DDP's gradient averaging gives the single-process gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.distributed import gather_with_grad
from pipeline.losses import barlow_twins
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig, build_backbone, build_mlp


@dataclass(frozen=True)
class BarlowTwinsConfig:
    name: str = "barlow_twins"
    lambd: float = 0.0051
    gather: bool = True

    def __post_init__(self) -> None:
        if self.lambd < 0:
            raise ConfigError(f"method.lambd must be >= 0, got {self.lambd}")


class BarlowTwins(nn.Module):
    def __init__(self, model: ModelConfig, cfg: BarlowTwinsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.projector = build_mlp(feature_dim, model.projector)

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "barlow_twins")
        z = encode(self._project, global_crops) + encode(self._project, local_crops)  # V x (B, D)
        if self.cfg.gather:
            z = [gather_with_grad(x) for x in z]  # V x (W B, D)
        pairs = crop_pairs(len(global_crops), len(z), symmetric_loss=True)  # 2 crops: just (1, 0)
        return sum(barlow_twins(z[i], z[j], self.cfg.lambd) for i, j in pairs) / len(pairs), {}

    def _project(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(images))

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
