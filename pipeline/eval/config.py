"""`eval:` section: the online kNN monitor run at epoch ends (pipeline.engine.online_eval)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import ConfigError


@dataclass(frozen=True)
class EvalConfig:
    every_epochs: int = 0  # 0 = no online kNN; N = after every N-th epoch (needs data.val_shards)
    k: int = 200  # neighbours, as in InstDisc / lightly's CIFAR-10 benchmark
    temperature: float = 0.1  # neighbour weight exp(cos_sim / temperature)
    embed_map: bool = False  # also write a 2-D PCA map of the validation embeddings each time

    def __post_init__(self) -> None:
        if self.every_epochs < 0:
            raise ConfigError(f"eval.every_epochs must be >= 0, got {self.every_epochs}")
        if self.k < 1:
            raise ConfigError(f"eval.k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ConfigError(f"eval.temperature must be > 0, got {self.temperature}")
