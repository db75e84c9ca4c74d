"""SimCLR (Chen et al., 2020): backbone -> projector, NT-Xent with every other view of the global batch
as negatives (gathered across ranks with gradients, `pipeline.losses.info_nce(gather=True)`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.config import ConfigError
from pipeline.losses import info_nce
from pipeline.methods.views import global_views
from pipeline.models import ModelConfig, build_backbone, build_mlp


@dataclass(frozen=True)
class SimCLRConfig:
    """gather: negatives from every rank (else only the local batch); chunk_size: blockwise NT-Xent for
    very large batches (same value and gradients, flat memory)."""

    name: str = "simclr"
    temperature: float = 0.2
    gather: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"method.chunk_size must be > 0 or null, got {self.chunk_size}")


class SimCLR(nn.Module):
    def __init__(self, model: ModelConfig, cfg: SimCLRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.projector = build_mlp(feature_dim, model.projector)

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        v1, v2 = global_views(views, "simclr")
        z = self.projector(self.backbone(torch.cat([v1, v2])))  # (2B, D): one pass, BN over both views
        z1, z2 = z.chunk(2)
        loss = info_nce(z1, z2, self.cfg.temperature, gather=self.cfg.gather, chunk_size=self.cfg.chunk_size)
        return loss, {}

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        return {}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
