"""`optim:` section: optimizer, its base hyper-parameters and their schedules."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt", "none")


@dataclass(frozen=True)
class OptimConfig:
    """lr is the base rate at `reference_batch_size`; the peak rate is scaled to the global batch by
    `lr_scaling` (linear: x B/ref, Goyal et al. 2017; sqrt: x sqrt(B/ref), for LARS/Adam at large B).

    Schedules (pipeline.optim.schedule): lr warms up linearly for `warmup_epochs` then follows a cosine
    to `final_lr_ratio` x peak; weight decay and momentum follow a cosine from their value to the `_end`
    value (None: constant). For adamw, `momentum` is beta1.
    """

    name: str = "sgd"
    lr: float = 0.05
    lr_scaling: str = "linear"
    reference_batch_size: int = 256
    weight_decay: float = 1e-4
    weight_decay_end: float | None = None
    momentum: float = 0.9
    momentum_end: float | None = None
    warmup_epochs: float = 0.0
    final_lr_ratio: float = 0.0
    trust_coefficient: float = 0.001
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"optim.lr_scaling must be one of {LR_SCALINGS}, got {self.lr_scaling!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.reference_batch_size <= 0:
            raise ConfigError(f"optim.reference_batch_size must be > 0, got {self.reference_batch_size}")
        for key in ("weight_decay", "weight_decay_end", "warmup_epochs", "final_lr_ratio", "eps"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"optim.{key} must be >= 0, got {value}")
        for key in ("momentum", "momentum_end", "beta2"):
            value = getattr(self, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"optim.{key} must be in [0, 1), got {value}")
        if self.final_lr_ratio > 1:
            raise ConfigError(f"optim.final_lr_ratio must be <= 1, got {self.final_lr_ratio}")
        if self.trust_coefficient <= 0:
            raise ConfigError(f"optim.trust_coefficient must be > 0, got {self.trust_coefficient}")
