"""DCL / DCLW (Yeh et al., 2022): SimCLR with the positive pair taken out of the InfoNCE denominator
(`pipeline.losses.dcl`), optionally with the positive term weighted by the negative von Mises-Fisher
weight (`weighting: vmf`, DCLW). Negatives are gathered from every rank with gradients, as SimCLR's.

Multi-crop: the two-view loss for each pair of a global crop and another crop, averaged; each pair's
negatives are the other samples' views of those two crops."""

from __future__ import annotations

import torch

from pipeline.losses import dcl
from pipeline.methods.config import DCLConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops


class DCL(ProjectedEncoder):
    cfg: DCLConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "dcl")
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        c = self.cfg
        sigma = c.sigma if c.weighting == "vmf" else None
        pairs = crop_pairs(len(global_crops), len(z), symmetric_loss=True)  # the loss is symmetric
        return sum(dcl(z[i], z[j], c.temperature, c.gather, sigma) for i, j in pairs) / len(pairs), {}
