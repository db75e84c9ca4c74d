"""Triplet learning without labels: backbone -> projector -> L2-normalised embedding (FaceNet's
hypersphere, Schroff et al., 2015), the other view of the same image as the positive and the negative
mined from every other image's views of the global batch (gathered across ranks with gradients):
the nearest one (batch hard, Hermans et al., 2017) or the nearest one beyond the positive (semi-hard).

With multi-crop every crop is an anchor for each global crop's positive (`crop_pairs`), negatives mined
from the views of both crops of the pair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from pipeline.config import ConfigError
from pipeline.losses import mined_triplet
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import crop_pairs, encode, split_crops


@dataclass(frozen=True)
class TripletConfig:
    """margin: in Euclidean distance between unit vectors (0..2); mining: hard | semi-hard;
    gather: negatives from every rank (else only the local batch)."""

    name: str = "triplet"
    margin: float = 0.5
    mining: Literal["hard", "semi-hard"] = "semi-hard"
    gather: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.margin <= 2:
            raise ConfigError(f"method.margin must be in (0, 2] for unit vectors, got {self.margin}")


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
