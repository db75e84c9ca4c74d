"""VICReg (Bardes et al., 2022): invariance + variance + covariance terms on the two views'
projections. Variance and covariance are over the global batch (gathered with gradients, as the
paper's FullGatherLayer); every rank computes the same loss."""

from __future__ import annotations

import torch

from pipeline.distributed import gather_with_grad
from pipeline.losses import vicreg
from pipeline.losses.precision import upcast
from pipeline.methods.config import VICRegConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops


class VICReg(ProjectedEncoder):
    cfg: VICRegConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "vicreg")
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        if self.cfg.gather:
            z = [gather_with_grad(upcast(x)) for x in z]  # V x (W B, D), fp32: grads reduced in fp32
        pairs = crop_pairs(len(global_crops), len(z), symmetric_loss=True)  # 2 crops: just (1, 0)
        c = self.cfg
        losses = [
            vicreg(z[i], z[j], sim_weight=c.sim_weight, var_weight=c.var_weight, cov_weight=c.cov_weight)
            for i, j in pairs
        ]
        return sum(losses) / len(pairs), {}
