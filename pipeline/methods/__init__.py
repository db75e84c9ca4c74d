"""Self-supervised methods, one small file each, listed in one explicit registry.

Every method follows the contract of `pipeline.methods.base.Method` (forward, the two hooks, backbone,
embed) and has a frozen config dataclass whose `name` is its registry key. Adding a method: its file, a
config under configs/, and one line in `REGISTRY`; the interface and distributed parity tests iterate
over the registry.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from pipeline.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from pipeline.methods.base import Method
from pipeline.methods.byol import BYOL, BYOLConfig
from pipeline.methods.dino import DINO, DINOConfig
from pipeline.methods.mocov2 import MoCoV2, MoCoV2Config
from pipeline.methods.mocov3 import MoCoV3, MoCoV3Config
from pipeline.methods.simclr import SimCLR, SimCLRConfig
from pipeline.methods.supcon import SupCon, SupConConfig
from pipeline.methods.swav import SwAV, SwAVConfig
from pipeline.methods.triplet import Triplet, TripletConfig
from pipeline.methods.vicreg import VICReg, VICRegConfig


class Registered(NamedTuple):
    method: type[Method]
    config: type


REGISTRY: dict[str, Registered] = {
    "simclr": Registered(SimCLR, SimCLRConfig),
    "mocov2": Registered(MoCoV2, MoCoV2Config),
    "mocov3": Registered(MoCoV3, MoCoV3Config),
    "byol": Registered(BYOL, BYOLConfig),
    "barlow_twins": Registered(BarlowTwins, BarlowTwinsConfig),
    "vicreg": Registered(VICReg, VICRegConfig),
    "supcon": Registered(SupCon, SupConConfig),
    "dino": Registered(DINO, DINOConfig),
    "swav": Registered(SwAV, SwAVConfig),
    "triplet": Registered(Triplet, TripletConfig),
}
METHODS: dict[str, type[Method]] = {name: entry.method for name, entry in REGISTRY.items()}
METHOD_CONFIGS: dict[str, type] = {name: entry.config for name, entry in REGISTRY.items()}


def build_method(cfg: Any) -> Method:
    """The method named by `cfg.method.name`, built from `cfg.model` and `cfg.method` of a run Config."""
    return METHODS[cfg.method.name](cfg.model, cfg.method)


__all__ = ["METHODS", "METHOD_CONFIGS", "REGISTRY", "Method", "build_method"]
