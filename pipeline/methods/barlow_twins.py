"""Barlow Twins (Zbontar et al., 2021): drive the cross-correlation of the two views' projections to
the identity. The correlation is over the global batch: embeddings are gathered with gradients, every
rank computes the same loss, and DDP's gradient averaging gives the single-process gradient.

Each global crop goes through the network on its own, so BatchNorm's statistics are per view, as in the
official code: the loss standardises each view over the batch, and one BatchNorm pass over both views
learned measurably less (BENCHMARKS.md, "Barlow Twins: the cause of the gap")."""

from __future__ import annotations

import torch

from pipeline.distributed import gather_with_grad
from pipeline.losses import barlow_twins
from pipeline.losses.precision import upcast
from pipeline.methods.config import BarlowTwinsConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops


class BarlowTwins(ProjectedEncoder):
    cfg: BarlowTwinsConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "barlow_twins")
        z = encode(self.project, *([crop] for crop in global_crops), local_crops)  # V x (B, D)
        if self.cfg.gather:
            z = [gather_with_grad(upcast(x)) for x in z]  # V x (W B, D), fp32: grads reduced in fp32
        pairs = crop_pairs(len(global_crops), len(z), symmetric_loss=True)  # 2 crops: just (1, 0)
        return sum(barlow_twins(z[i], z[j], self.cfg.lambd) for i, j in pairs) / len(pairs), {}
