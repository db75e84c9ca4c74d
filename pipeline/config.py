"""One YAML file + dotted overrides -> nested frozen dataclasses, checked before anything runs.

Each section's dataclass lives next to its component; this module only knows how to build a dataclass
generically from its type hints, so adding a field to a component config needs no change here.
Errors name the dotted key and, for unknown keys, the closest valid one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A configuration mistake, reported in one line that names the dotted key."""


@dataclass(frozen=True)
class RunConfig:
    name: str
    output_dir: str
    seed: int = 0
    # Deterministic kernels wherever torch has one: bit-exact runs and resume on the CPU; on CUDA the few
    # ops without one (adaptive-pool and nll_loss backward) warn once and run, so GPU runs stay close,
    # not bit-identical.
    deterministic: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("run.name must not be empty")
        if not self.output_dir:
            raise ConfigError("run.output_dir must not be empty")
        if self.seed < 0:
            raise ConfigError(f"run.seed must be >= 0, got {self.seed}")


@dataclass(frozen=True)
class Config:
    """The whole run. Section types are the component configs (see `_sections`)."""

    run: RunConfig
    data: Any  # pipeline.data.config.DataConfig
    model: Any  # pipeline.models.config.ModelConfig
    method: Any  # pipeline.methods.METHOD_CONFIGS[method.name]
    optim: Any  # pipeline.optim.config.OptimConfig
    train: Any  # pipeline.engine.config.TrainConfig
    checkpoint: Any  # pipeline.engine.config.CheckpointConfig
    logging: Any  # pipeline.engine.config.LoggingConfig
    eval: Any  # pipeline.eval.config.EvalConfig


_REQUIRED_SECTIONS = ("run", "data", "model", "method", "optim")


def _sections() -> dict[str, type]:
    # Imported here, not at the top: the component config modules import ConfigError from this module.
    from pipeline.data.config import DataConfig
    from pipeline.engine.config import CheckpointConfig, LoggingConfig, TrainConfig
    from pipeline.eval.config import EvalConfig
    from pipeline.models.config import ModelConfig
    from pipeline.optim.config import OptimConfig

    return {
        "run": RunConfig,
        "data": DataConfig,
        "model": ModelConfig,
        "optim": OptimConfig,
        "train": TrainConfig,
        "checkpoint": CheckpointConfig,
        "logging": LoggingConfig,
        "eval": EvalConfig,
    }


def _method_configs() -> dict[str, type]:
    from pipeline.methods import METHOD_CONFIGS

    return METHOD_CONFIGS


def load(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read YAML at `path` (or start empty), apply `key.sub=value` overrides, build and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_yaml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    cfg = from_dict(raw)
    from pipeline.engine.config import check_combinations

    check_combinations(cfg)
    return cfg


def from_dict(raw: dict[str, Any]) -> Config:
    """Build the run config from plain nested dicts (as YAML gives them)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(raw).__name__}")
    sections = _sections()
    valid = [*sections, "method"]
    for key in raw:
        if key not in valid:
            raise ConfigError(_unknown(key, str(key), valid))
    for key in _REQUIRED_SECTIONS:
        if key not in raw:
            raise ConfigError(f"missing required section '{key}'")
    built = {name: build(cls, raw.get(name, {}), name) for name, cls in sections.items()}
    built["method"] = _build_method(raw["method"])
    return Config(**built)


def _build_method(raw: Any) -> Any:
    configs = _method_configs()
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"method.name is required, one of {sorted(configs)}")
    name = raw["name"]
    if name not in configs:
        raise ConfigError(_unknown(name, "method.name", sorted(configs), what="value"))
    return build(configs[name], raw, "method")


def build(cls: type, raw: Any, key: str) -> Any:
    """Build dataclass `cls` from mapping `raw`; `key` is its dotted position, used in errors."""
    if dataclasses.is_dataclass(raw) and isinstance(raw, cls):
        return raw
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{key} must be a mapping, got {type(raw).__name__} {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    for name in raw:
        if name not in fields:
            raise ConfigError(_unknown(f"{key}.{name}", str(name), list(fields), prefix=key))
    kwargs = {}
    for name, field in fields.items():
        dotted = f"{key}.{name}"
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], dotted)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{dotted}'")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{key}: {e}") from e


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against type `hint` (converting lists to tuples etc.), or raise naming `key`."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own error is the precise one (e.g. a nested unknown key)
            return _convert(value, options[0], key)
        for option in options:
            with contextlib.suppress(ConfigError):
                return _convert(value, option, key)
        raise ConfigError(f"{key} must be {_type_name(hint)}, got {_describe(value)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(_unknown(value, key, [str(a) for a in args], what="value"))
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {_describe(value)}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} items, got {len(value)}")
            items = [_convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))]
        else:
            item_hint = args[0] if args else Any
            items = [_convert(v, item_hint, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {_describe(value)}")
        if not args:
            return dict(value)
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_describe(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {_describe(value)}")
        return value
    if hint is float:
        if isinstance(value, str) and _parses_as_float(value):
            return float(value)  # YAML 1.1 reads `1e-3` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_describe(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_describe(value)}")
        return value
    if isinstance(hint, type):
        if not isinstance(value, hint):
            raise ConfigError(f"{key} must be {hint.__name__}, got {_describe(value)}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r} in the config dataclass")


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    names = [getattr(a, "__name__", str(a)) for a in args]
    suffix = " or null" if type(None) in typing.get_args(hint) else ""
    return " or ".join(names) + suffix


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _unknown(given: Any, key: str, valid: list[str], *, prefix: str = "", what: str = "key") -> str:
    close = difflib.get_close_matches(str(given).rsplit(".", 1)[-1], valid, n=1, cutoff=0.5)
    if what == "value":
        msg = f"{key}: unknown value {given!r}, expected one of {valid}"
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")
    msg = f"unknown key '{given}'"
    if close:
        return msg + f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return msg + f"; valid keys{' in ' + prefix if prefix else ''}: {', '.join(valid)}"


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from e
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}".replace("\n", " ")) from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, got {type(raw).__name__}")
    return raw


def _apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value`: the value is parsed as YAML (`3` int, `1e-3` float, `null`, `[1, 2]`, `true`)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.sub=value")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override '{item}' has an empty key part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: value {text!r} is not valid YAML") from e
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: '{'.'.join(parts[: i + 1])}' is not a section")
        node = child
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dicts/lists (tuples become lists) for YAML/JSON/W&B."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))
