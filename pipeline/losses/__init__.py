"""Self-supervised losses: pure tensor code, one per module, each documenting its formula and paper.

They never move tensors between devices and work without a process group; cross-rank work (the
`gather=` options) goes through `pipeline.distributed`. Logits and statistics are computed in fp32
even under bf16 autocast.
"""

from pipeline.losses.barlow_twins import barlow_twins
from pipeline.losses.byol import byol
from pipeline.losses.info_nce import info_nce
from pipeline.losses.moco import moco_info_nce
from pipeline.losses.supcon import supcon
from pipeline.losses.triplet import batch_hard_triplet, triplet
from pipeline.losses.vicreg import vicreg

__all__ = [
    "barlow_twins",
    "batch_hard_triplet",
    "byol",
    "info_nce",
    "moco_info_nce",
    "supcon",
    "triplet",
    "vicreg",
]
