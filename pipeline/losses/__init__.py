"""Self-supervised losses: pure tensor code, one per module, each documenting its formula and paper.

They never move tensors between devices and work without a process group; cross-rank work (the
`gather=` options) goes through `pipeline.distributed`. Logits and statistics are computed in fp32
even under bf16 autocast.
"""

from pipeline.losses.barlow_twins import barlow_twins
from pipeline.losses.byol import byol
from pipeline.losses.dcl import dcl
from pipeline.losses.dino import dino_loss
from pipeline.losses.info_nce import info_nce
from pipeline.losses.moco import moco_info_nce
from pipeline.losses.nnclr import nearest_neighbours, nnclr
from pipeline.losses.simsiam import simsiam
from pipeline.losses.supcon import supcon
from pipeline.losses.swav import sinkhorn_knopp, swav_loss
from pipeline.losses.triplet import batch_hard_triplet, mined_triplet, triplet
from pipeline.losses.vicreg import vicreg

__all__ = [
    "barlow_twins",
    "batch_hard_triplet",
    "byol",
    "dcl",
    "dino_loss",
    "info_nce",
    "mined_triplet",
    "moco_info_nce",
    "nearest_neighbours",
    "nnclr",
    "simsiam",
    "sinkhorn_knopp",
    "supcon",
    "swav_loss",
    "triplet",
    "vicreg",
]
