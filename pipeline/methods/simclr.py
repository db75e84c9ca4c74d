"""SimCLR (Chen et al., 2020): backbone -> projector, NT-Xent with every other view of the global batch
as negatives (gathered across ranks with gradients, `pipeline.losses.info_nce(gather=True)`).

With more than two crops (multi-crop) every crop of an image is a positive of every other: the
multi-positive NT-Xent (SupCon's loss with the sample index as label), which is NT-Xent for two crops.

`negatives` picks how the negatives enter the denominator: all of them (the paper), debiased for the
chance that a "negative" shares the anchor's class (Chuang et al., 2020), or re-weighted towards the
hard ones (Robinson et al., 2021); see `pipeline.losses.info_nce`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.config import ConfigError
from pipeline.distributed import rank
from pipeline.losses import info_nce, supcon
from pipeline.methods.encoder import ProjectedEncoder
from pipeline.methods.views import encode, split_crops


@dataclass(frozen=True)
class SimCLRConfig:
    """gather: negatives from every rank (else only the local batch); chunk_size: blockwise NT-Xent for
    very large two-view batches (same value and gradients, flat memory); negatives: all | debiased
    (class prior tau_plus, the chance that two random images share a class: 0.1 for 10 balanced
    classes) | hard (concentration beta, debiased by tau_plus; tau_plus=0 for hard weighting alone)."""

    name: str = "simclr"
    temperature: float = 0.2
    gather: bool = True
    chunk_size: int | None = None
    negatives: Literal["all", "debiased", "hard"] = "all"
    tau_plus: float = 0.1
    beta: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"method.temperature must be > 0, got {self.temperature}")
        if self.chunk_size is not None and self.chunk_size <= 0:
            raise ConfigError(f"method.chunk_size must be > 0 or null, got {self.chunk_size}")
        if not 0 <= self.tau_plus < 1:
            raise ConfigError(f"method.tau_plus must be in [0, 1), got {self.tau_plus}")
        if self.beta < 0:
            raise ConfigError(f"method.beta must be >= 0, got {self.beta}")
        if self.negatives != "all" and self.chunk_size is not None:
            raise ConfigError(
                f"method.negatives={self.negatives} needs the full similarity matrix; "
                "set method.chunk_size=null"
            )


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
