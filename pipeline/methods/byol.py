"""BYOL (Grill et al., 2020): the online branch predicts the momentum (target) encoder's projection of
the other view; symmetric normalised-regression loss, target momentum on a cosine schedule to 1.
No negatives, so nothing is gathered across ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.losses import byol
from pipeline.methods.momentum import MomentumEncoder, check_momentum, momentum_at
from pipeline.methods.views import global_views
from pipeline.models import ModelConfig, build_backbone, build_mlp


@dataclass(frozen=True)
class BYOLConfig:
    name: str = "byol"
    momentum: float = 0.99
    momentum_end: float | None = 1.0

    def __post_init__(self) -> None:
        check_momentum(self.momentum, self.momentum_end)


class BYOL(nn.Module):
    def __init__(self, model: ModelConfig, cfg: BYOLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone, feature_dim = build_backbone(model)
        self.projector = build_mlp(feature_dim, model.projector)
        self.predictor = build_mlp(model.projector.output_dim, model.default_predictor())
        self.momentum_encoder = MomentumEncoder(self.backbone, self.projector)

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        v1, v2 = global_views(views, "byol")
        p1 = self.predictor(self.projector(self.backbone(v1)))  # (B, D)
        p2 = self.predictor(self.projector(self.backbone(v2)))
        with torch.no_grad():
            z1, z2 = self.momentum_encoder(v1), self.momentum_encoder(v2)
        return byol(p1, z2) + byol(p2, z1), {}

    def on_step_end(self, step: int, total_steps: int) -> dict[str, float]:
        m = momentum_at(step, total_steps, self.cfg.momentum, self.cfg.momentum_end)
        self.momentum_encoder.update([self.backbone, self.projector], m)
        return {"ema_momentum": m}

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)
