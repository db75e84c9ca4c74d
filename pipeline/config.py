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
from pipeline.data.recipes import RECIPES
from pipeline.engine.config import CheckpointConfig, LoggingConfig, TrainConfig, deepspeed_stage
from pipeline.eval.config import EvalConfig
from pipeline.methods.config import METHOD_CONFIGS, MethodConfig, SwAVConfig
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

__all__ = [
    "Config",
    "ConfigError",
    "RunConfig",
    "check_combinations",
    "check_launch",
    "from_dict",
    "load",
    "to_dict",
]


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
    check_views(cfg)
    if cfg.data.dtype == "float16" and cfg.train.precision == "fp32":
        raise ConfigError(_FLOAT16)
    check_launch(cfg, world_size=1, device_type=None)


_FLOAT16 = (
    "data.dtype=float16 feeds half-precision views to a model that runs in fp32 or CPU autocast; it needs a "
    "GPU with train.precision=auto or bf16; set data.dtype=float32"
)


def check_views(cfg: Config) -> None:
    """Every method trains on at least two global crops, which it tells apart from the local crops after
    them by their size (pipeline.methods.views.split_crops); SwAV's queue takes exactly two."""
    recipe = RECIPES[cfg.data.recipe]  # a known name: DataConfig resolved its views
    n_global = recipe.global_crops if cfg.data.global_crops is None else cfg.data.global_crops
    n_local = recipe.local_crops if cfg.data.local_crops is None else cfg.data.local_crops
    name = cfg.method.name
    if n_global < 2:
        raise ConfigError(
            f"data.global_crops={n_global}: method.name={name} trains on two global crops or more; "
            "set data.global_crops=2 (or null for the recipe's)"
        )
    if n_local and cfg.data.local_image_size == cfg.data.image_size:
        raise ConfigError(
            f"data.local_image_size={cfg.data.local_image_size} equals data.image_size: method.name={name} "
            "tells local crops from global ones by their size; choose a different data.local_image_size"
        )
    if isinstance(cfg.method, SwAVConfig) and cfg.method.queue_size and n_global != 2:
        raise ConfigError(
            f"method.queue_size={cfg.method.queue_size}: the SwAV queue holds two global crops, "
            f"data.global_crops is {n_global}; set data.global_crops=2 or method.queue_size=0"
        )


def check_launch(cfg: Config, world_size: int, device_type: str | None) -> None:
    """What needs the number of processes and the device: checked by every rank once launched (and with
    one process at load), before the run folder or a checkpoint is written."""
    method = cfg.method
    if isinstance(method, SwAVConfig) and method.queue_size:
        rows = cfg.data.batch_size * (world_size if method.gather else 1)  # one enqueue per micro-batch
        if method.queue_size % rows:
            ranks = f" x {world_size} processes" if method.gather and world_size > 1 else ""
            raise ConfigError(
                f"method.queue_size={method.queue_size} must be a multiple of the global batch {rows} "
                f"(data.batch_size={cfg.data.batch_size}{ranks}); choose a multiple of {rows}, or "
                "method.queue_size=0"
            )
    if cfg.data.dtype == "float16" and device_type == "cpu":
        raise ConfigError(_FLOAT16)
