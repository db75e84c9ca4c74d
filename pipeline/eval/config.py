"""`eval:` section: the online kNN monitor run at epoch ends (pipeline.engine.online_eval)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pipeline.schema import Bound, Section


@dataclass(frozen=True)
class EvalConfig(Section, key="eval"):
    # 0 = no online kNN; N = after every N-th epoch (needs data.val_shards)
    every_epochs: Annotated[int, Bound(ge=0)] = 0
    k: Annotated[int, Bound(ge=1)] = 200  # neighbours, as in InstDisc / lightly's CIFAR-10 benchmark
    temperature: Annotated[float, Bound(gt=0)] = 0.1  # neighbour weight exp(cos_sim / temperature)
    embed_map: bool = False  # also write a 2-D PCA map of the validation embeddings each time
