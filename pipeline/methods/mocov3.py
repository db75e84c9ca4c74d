"""MoCo v3 (Chen, Xie & He, 2021): symmetric InfoNCE between the online branch's predictions and the
momentum encoder's keys of the other view, in-batch keys over the global batch (no queue), momentum
on a cosine schedule towards 1. Works with ResNets and ViTs (use a projector with last_batch_norm)."""

from __future__ import annotations

import torch

from pipeline.losses import moco_info_nce
from pipeline.methods.config import MoCoV3Config
from pipeline.methods.momentum import MomentumMethod
from pipeline.methods.views import crop_pairs, encode, split_crops
from pipeline.models import ModelConfig, build_mlp


class MoCoV3(MomentumMethod):
    cfg: MoCoV3Config

    def __init__(self, model: ModelConfig, cfg: MoCoV3Config) -> None:
        super().__init__(model, cfg)
        self.predictor = build_mlp(model.projector.output_dim, model.default_predictor())

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "mocov3")
        q = encode(self._predict, global_crops, local_crops)  # V x (B, D)
        with torch.no_grad():
            k = encode(self.momentum_encoder, global_crops)
        t, gather = self.cfg.temperature, self.cfg.gather
        pairs = crop_pairs(len(global_crops), len(q))
        loss = 2 * sum(moco_info_nce(q[i], k[j], None, t, gather=gather) for i, j in pairs) / len(pairs)
        return loss * 2 * t, {}  # the paper's 2t scaling keeps gradients comparable across temperatures

    def _predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.project(images))
