"""Self-supervised methods, one small file each, listed in one explicit registry.

Every method is an `nn.Module` with the trainer's narrow interface:
  forward(views: list[Tensor], labels: Tensor | None) -> (loss, logs)   the training step's loss
  on_step_end(step: int, total_steps: int) -> dict[str, float]       after the optimizer step (EMA)
  backbone (the online backbone; `backbone.*` state_dict keys load into `build_backbone(cfg.model)[0]`)
  embed(images) -> (B, feature_dim)                                   features for kNN / evaluation
"""

from __future__ import annotations

from typing import Any

from torch import nn

from pipeline.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from pipeline.methods.byol import BYOL, BYOLConfig
from pipeline.methods.mocov2 import MoCoV2, MoCoV2Config
from pipeline.methods.mocov3 import MoCoV3, MoCoV3Config
from pipeline.methods.simclr import SimCLR, SimCLRConfig
from pipeline.methods.supcon import SupCon, SupConConfig
from pipeline.methods.vicreg import VICReg, VICRegConfig

METHODS: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "supcon": SupCon,
}
METHOD_CONFIGS: dict[str, type] = {
    "simclr": SimCLRConfig,
    "mocov2": MoCoV2Config,
    "mocov3": MoCoV3Config,
    "byol": BYOLConfig,
    "barlow_twins": BarlowTwinsConfig,
    "vicreg": VICRegConfig,
    "supcon": SupConConfig,
}


def build_method(cfg: Any) -> nn.Module:
    """The method named by `cfg.method.name`, built from `cfg.model` and `cfg.method` of a run Config."""
    return METHODS[cfg.method.name](cfg.model, cfg.method)


__all__ = ["METHODS", "METHOD_CONFIGS", "build_method"]
