"""SimSiam (Chen & He, 2021): a predictor on the projection of one view regresses the projection of the
other, behind a stop-gradient: no negatives, no momentum encoder, no large batch. The symmetric
negative cosine (`pipeline.losses.simsiam`); nothing is gathered across ranks.

Multi-crop: every crop's prediction regresses the projections of the global crops (not its own)."""

from __future__ import annotations

import torch

from pipeline.losses import simsiam
from pipeline.methods.config import SimSiamConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig, build_mlp


class SimSiam(ProjectedEncoder):
    cfg: SimSiamConfig

    def __init__(self, model: ModelConfig, cfg: SimSiamConfig) -> None:
        super().__init__(model, cfg)
        self.predictor = build_mlp(model.projector.output_dim, model.default_predictor())

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "simsiam")
        g = len(global_crops)
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        p = encode(self.predictor, z[:g], z[g:])  # V x (B, D), BN over each resolution's crops as for z
        pairs = crop_pairs(g, len(z))
        return sum(simsiam(p[i], z[j]) for i, j in pairs) / len(pairs), {}  # 2 crops: the paper's D/2 + D/2
