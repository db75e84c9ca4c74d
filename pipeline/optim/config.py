"""`optim:` section: optimizer, its base hyper-parameters and their schedules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pipeline.schema import Bound, ConfigError, Section

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class OptimConfig(Section, key="optim"):
    """lr is the base rate at `reference_batch_size`; the peak rate is scaled to the global batch by
    `lr_scaling` (linear: x B/ref, Goyal et al. 2017; sqrt: x sqrt(B/ref), for LARS/Adam at large B).

    Schedules (pipeline.optim.schedule): lr warms up linearly for `warmup_epochs` then follows a cosine
    to `final_lr_ratio` x peak; weight decay and momentum follow a cosine from their value to the `_end`
    value (None: constant). For adamw, `momentum` is beta1.
    """

    name: str = "sgd"
    lr: Annotated[float, Bound(gt=0)] = 0.05
    lr_scaling: str = "linear"
    reference_batch_size: Annotated[int, Bound(gt=0)] = 256
    weight_decay: Annotated[float, Bound(ge=0)] = 1e-4
    weight_decay_end: Annotated[float, Bound(ge=0)] | None = None
    momentum: Annotated[float, Bound(ge=0, lt=1)] = 0.9
    momentum_end: Annotated[float, Bound(ge=0, lt=1)] | None = None
    warmup_epochs: Annotated[float, Bound(ge=0)] = 0.0
    final_lr_ratio: Annotated[float, Bound(ge=0, le=1)] = 0.0
    trust_coefficient: Annotated[float, Bound(gt=0)] = 0.001
    beta2: Annotated[float, Bound(ge=0, lt=1)] = 0.999
    eps: Annotated[float, Bound(ge=0)] = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"optim.lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
