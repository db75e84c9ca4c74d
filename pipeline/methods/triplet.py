"""Triplet learning without labels: backbone -> projector -> L2-normalised embedding (FaceNet's
hypersphere, Schroff et al., 2015), the other view of the same image as the positive and the negative
mined from every other image's views of the global batch (gathered across ranks with gradients):
the nearest one (batch hard, Hermans et al., 2017) or the nearest one beyond the positive (semi-hard).

With multi-crop every crop is an anchor for each global crop's positive (`crop_pairs`), negatives mined
from the views of both crops of the pair."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.losses import mined_triplet
from pipeline.methods.config import TripletConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops


class Triplet(ProjectedEncoder):
    cfg: TripletConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "triplet")
        z = [F.normalize(x, dim=1) for x in encode(self.project, global_crops, local_crops)]  # V x (B, D)
        c = self.cfg
        pairs = crop_pairs(len(global_crops), len(z))
        losses = [mined_triplet(z[i], z[j], c.margin, c.mining, gather=c.gather) for i, j in pairs]
        return sum(losses) / len(pairs), {}
