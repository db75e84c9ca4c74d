"""SimCLR (Chen et al., 2020): backbone -> projector, NT-Xent with every other view of the global batch
as negatives (gathered across ranks with gradients, `pipeline.losses.info_nce(gather=True)`).

With more than two crops (multi-crop) every crop of an image is a positive of every other: the
multi-positive NT-Xent (SupCon's loss with the sample index as label), which is NT-Xent for two crops.

`negatives` picks how the negatives enter the denominator: all of them (the paper), debiased for the
chance that a "negative" shares the anchor's class (Chuang et al., 2020), or re-weighted towards the
hard ones (Robinson et al., 2021); see `pipeline.losses.info_nce`."""

from __future__ import annotations

import torch

from pipeline.distributed import rank
from pipeline.losses import info_nce, supcon
from pipeline.methods.config import SimCLRConfig
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import encode, split_crops


class SimCLR(ProjectedEncoder):
    cfg: SimCLRConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "simclr")
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        c = self.cfg
        if len(z) == 2:
            loss = info_nce(
                z[0], z[1], c.temperature, gather=c.gather, chunk_size=c.chunk_size,
                negatives=c.negatives, tau_plus=c.tau_plus, beta=c.beta,
            )  # fmt: skip
            return loss, {}
        if c.negatives != "all":
            raise ValueError(
                f"method.negatives={c.negatives} is defined for two views, this batch has {len(z)}; "
                "set data.local_crops=0 or method.negatives=all"
            )
        if c.chunk_size is not None:
            raise ValueError(
                f"method.chunk_size: the blockwise NT-Xent takes two views, this batch has {len(z)}; "
                "set method.chunk_size=null for multi-crop"
            )
        b = z[0].shape[0]
        sample_ids = torch.arange(b, device=z[0].device) + (rank() * b if c.gather else 0)
        return supcon(torch.stack(z, dim=1), sample_ids, c.temperature, gather=c.gather), {}
