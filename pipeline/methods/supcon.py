"""Supervised contrastive learning (Khosla et al., 2020): SimCLR's encoder, but every view of the same
class is a positive (labels from the shards' `.cls`), `pipeline.losses.supcon` in its "out" form."""

from __future__ import annotations

import torch

from pipeline.losses import supcon
from pipeline.methods.config import SupConConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import encode, split_crops


class SupCon(ProjectedEncoder):
    cfg: SupConConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        if labels is None:
            raise ValueError("supcon needs labels: shard the data with --labels auto")
        global_crops, local_crops = split_crops(views, "supcon")
        z = torch.stack(encode(self.project, global_crops, local_crops), dim=1)  # (B, V, D): every crop
        return supcon(z, labels, self.cfg.temperature, gather=self.cfg.gather), {}
