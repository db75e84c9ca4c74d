"""The method registry: `method.name` -> the class that trains it, one line per method.

Each class's config is `pipeline.methods.config.METHOD_CONFIGS[name]`; tests/test_methods.py checks that
both list the same names, and the interface and distributed parity tests iterate over `METHODS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.barlow_twins import BarlowTwins
from pipeline.methods.base import Method
from pipeline.methods.byol import BYOL
from pipeline.methods.dcl import DCL
from pipeline.methods.dino import DINO
from pipeline.methods.mocov2 import MoCoV2
from pipeline.methods.mocov3 import MoCoV3
from pipeline.methods.nnclr import NNCLR
from pipeline.methods.simclr import SimCLR
from pipeline.methods.simsiam import SimSiam
from pipeline.methods.supcon import SupCon
from pipeline.methods.swav import SwAV
from pipeline.methods.triplet import Triplet
from pipeline.methods.vicreg import VICReg

if TYPE_CHECKING:
    from pipeline.config import Config

METHODS: dict[str, type[Method]] = {
    "simclr": SimCLR,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "byol": BYOL,
    "barlow_twins": BarlowTwins,
    "vicreg": VICReg,
    "supcon": SupCon,
    "dino": DINO,
    "swav": SwAV,
    "triplet": Triplet,
    "nnclr": NNCLR,
    "simsiam": SimSiam,
    "dcl": DCL,
}


def build_method(cfg: Config) -> Method:
    """The method named by `cfg.method.name`, built from `cfg.model` and `cfg.method` of a run Config."""
    return METHODS[cfg.method.name](cfg.model, cfg.method)
