"""SimCLR (Chen et al., 2020): backbone -> projector, NT-Xent with every other view of the global batch
as negatives (gathered across ranks with gradients, `pipeline.losses.info_nce(gather=True)`).

With more than two crops (multi-crop) every crop of an image is a positive of every other: the
multi-positive NT-Xent (SupCon's loss with the sample index as label), which is NT-Xent for two crops."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import ConfigError
from pipeline.distributed import rank
from pipeline.losses import info_nce, supcon
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import encode, split_crops


@dataclass(frozen=True)
class SimCLRConfig:
    """gather: negatives from every rank (else only the local batch); chunk_size: blockwise NT-Xent for
    very large two-view batches (same value and gradients, flat memory)."""

    name: str = "simclr"
    temperature: float = 0.2
    gather: bool = True
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"method.chunk_size must be > 0 or null, got {self.chunk_size}")


class SimCLR(ProjectedEncoder):
    cfg: SimCLRConfig

    def forward(
        self, views: list[torch.Tensor], labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        global_crops, local_crops = split_crops(views, "simclr")
        z = encode(self.project, global_crops, local_crops)  # V x (B, D)
        t, gather = self.cfg.temperature, self.cfg.gather
        if len(z) == 2:
            return info_nce(z[0], z[1], t, gather=gather, chunk_size=self.cfg.chunk_size), {}
        if self.cfg.chunk_size is not None:
            raise ValueError(
                f"method.chunk_size: the blockwise NT-Xent takes two views, this batch has {len(z)}; "
                "set method.chunk_size=null for multi-crop"
            )
        b = z[0].shape[0]
        sample_ids = torch.arange(b, device=z[0].device) + (rank() * b if gather else 0)
        return supcon(torch.stack(z, dim=1), sample_ids, t, gather=gather), {}
