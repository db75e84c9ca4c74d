"""The composed run config: YAML file(s) + dotted overrides -> `Config`, checked before anything runs.

The top of the config layers: each section's dataclass lives next to its component and imports only the
leaf `pipeline.schema` (parsing, bounds, `ConfigError`); this module puts the sections together and checks
what no single section can see (`check_combinations`). Loading a config imports no torch.
Errors name the dotted key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pipeline.data.config import DataConfig
from pipeline.engine.config import CheckpointConfig, LoggingConfig, TrainConfig, deepspeed_stage
from pipeline.eval.config import EvalConfig
from pipeline.methods.config import METHOD_CONFIGS, MethodConfig
from pipeline.models.config import ModelConfig
from pipeline.optim.config import OptimConfig
from pipeline.schema import (
    Bound,
    ConfigError,
    Section,
    apply_override,
    build,
    compose,
    to_dict,
    unknown,
)

__all__ = ["Config", "ConfigError", "RunConfig", "check_combinations", "from_dict", "load", "to_dict"]


@dataclass(frozen=True)
class RunConfig(Section, key="run"):
    name: str
    output_dir: str
    seed: Annotated[int, Bound(ge=0)] = 0
    # Deterministic kernels wherever torch has one: bit-exact runs and resume on the CPU; on CUDA the few
    # ops without one (adaptive-pool and nll_loss backward) warn once and run, so GPU runs stay close,
    # not bit-identical.
    deterministic: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.name:
            raise ConfigError("run.name must not be empty")
        if not self.output_dir:
            raise ConfigError("run.output_dir must not be empty")


@dataclass(frozen=True)
class Config:
    """The whole run: one field per YAML section; `method` is the subclass named by `method.name`."""

    run: RunConfig
    data: DataConfig
    model: ModelConfig
    method: MethodConfig
    optim: OptimConfig
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


def load(path: str | Path | list[str | Path] | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Compose the YAML file(s) at `path` (several are merged in order, each after its `defaults:`; None
    starts empty), apply `key.sub=value` overrides, build and validate."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    raw: dict[str, Any] = compose([Path(p) for p in paths])
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(raw)
    check_combinations(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """Build the run config from plain nested dicts (as YAML gives them)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key in raw:
        if key not in sections:
            raise ConfigError(unknown(key, str(key), list(sections)))
    for key, f in sections.items():
        if key not in raw and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required section '{key}'")
    hints = typing.get_type_hints(Config)
    built = {key: build(hints[key], raw.get(key), key) for key in sections if key != "method"}
    return Config(**built, method=_build_method(raw["method"]))


def _build_method(raw: Any) -> MethodConfig:
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"method.name is required, one of {sorted(METHOD_CONFIGS)}")
    name = raw["name"]
    if name not in METHOD_CONFIGS:
        raise ConfigError(unknown(name, "method.name", sorted(METHOD_CONFIGS), what="value"))
    return build(METHOD_CONFIGS[name], raw, "method")


def check_combinations(cfg: Config) -> None:
    """Cross-section checks: combinations that would fail or silently do the wrong thing later."""
    if cfg.train.engine == "deepspeed":
        stage = deepspeed_stage(cfg.train.deepspeed_config)
        if stage >= 1 and cfg.optim.name == "lars":
            # ZeRO hands the client optimizer flat partitions: LARS's per-layer trust ratio would be wrong.
            raise ConfigError(
                f"optim.name=lars cannot run under ZeRO stage {stage} (per-layer norms are split across "
                "partitions); use train.engine=ddp, ZeRO stage 0, or optim.name=sgd/adamw"
            )
        if stage >= 1 and cfg.method.edits_gradients:  # see pipeline.methods.base
            raise ConfigError(
                f"method.name={cfg.method.name} edits whole gradients or weights between backward and the "
                f"optimizer step, which ZeRO stage {stage} partitions; use train.engine=ddp or "
                "train.deepspeed_config=configs/deepspeed/zero0.json"
            )
    if cfg.eval.every_epochs and cfg.data.val_shards is None:
        raise ConfigError("eval.every_epochs > 0 needs data.val_shards (labelled held-out shards for kNN)")
