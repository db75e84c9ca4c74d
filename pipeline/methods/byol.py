"""BYOL (Grill et al., 2020): the online branch predicts the momentum (target) encoder's projection of
the other view; symmetric normalised-regression loss, target momentum on a cosine schedule to 1.
No negatives, so nothing is gathered across ranks."""

from __future__ import annotations

import torch

from pipeline.losses import byol
from pipeline.methods.config import BYOLConfig
from pipeline.methods.momentum import MomentumMethod
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig, build_mlp


class BYOL(MomentumMethod):
    cfg: BYOLConfig

    def __init__(self, model: ModelConfig, cfg: BYOLConfig) -> None:
        super().__init__(model, cfg)
        self.predictor = build_mlp(model.projector.output_dim, model.default_predictor())

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "byol")
        p = encode(self._predict, global_crops, local_crops)  # V x (B, D)
        with torch.no_grad():
            z = encode(self.momentum_encoder, global_crops)
        pairs = crop_pairs(len(global_crops), len(p))
        return 2 * sum(byol(p[i], z[j]) for i, j in pairs) / len(pairs), {}  # 2 crops: the paper's sum

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.project(images))
