"""The leaf of the config layers: frozen dataclasses built from YAML mappings by their type hints.

Every config section imports only this module (no torch, nothing else from `pipeline`), and the composed
run config (`pipeline.config`) sits on top of them. What is here:
- `ConfigError`: a configuration mistake, in one line that names the dotted key;
- `build(cls, mapping, key)`: a dataclass from a mapping, checking every value against its type hint
  (unknown keys name the closest valid one);
- `Bound` and `Section`: numeric bounds declared on the field (`epochs: Annotated[int, Bound(ge=1)]`),
  checked when a section is constructed, so a mistake fails the same way from YAML, an override or Python;
- `compose` (config files merged in order, each after its `defaults:` list), `read_yaml`,
  `apply_override` (`a.b.c=value`) and `to_dict` (back to plain YAML/JSON values).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

# The key that lists a file's base configs (`defaults:` as Hydra writes it, or `base:`).
BASE_KEYS = ("defaults", "base")


class ConfigError(ValueError):
    """A configuration mistake, reported in one line that names the dotted key."""


@dataclass(frozen=True)
class Bound:
    """Numeric bounds of a field or of each item of a tuple: `Annotated[float, Bound(gt=0, le=1)]`."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def holds(self, value: float) -> bool:
        # Written as "not (inside)" tests so that NaN fails every bound.
        return not (
            (self.ge is not None and not value >= self.ge)
            or (self.gt is not None and not value > self.gt)
            or (self.le is not None and not value <= self.le)
            or (self.lt is not None and not value < self.lt)
        )

    def __str__(self) -> str:
        low = f"[{self.ge}" if self.ge is not None else f"({self.gt}" if self.gt is not None else None
        high = f"{self.le}]" if self.le is not None else f"{self.lt})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f">= {self.ge}" if self.ge is not None else f"> {self.gt}"
        return f"<= {self.le}" if self.le is not None else f"< {self.lt}"


class Section:
    """Base of a section's dataclass: construction checks the `Bound`s of its fields and of the dataclasses
    nested in it, naming keys under the section's `key` (`class TrainConfig(Section, key="train")`).
    A subclass that adds cross-field rules in `__post_init__` calls `super().__post_init__()` first."""

    key: typing.ClassVar[str]

    def __init_subclass__(cls, key: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key:
            cls.key = key

    def __post_init__(self) -> None:
        check_bounds(self, self.key)


def check_bounds(obj: Any, key: str) -> None:
    """Raise ConfigError for the first field of dataclass `obj` (or of one nested in it) out of its bounds."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    for field in dataclasses.fields(obj):
        value, dotted = getattr(obj, field.name), f"{key}.{field.name}"
        if value is None:
            continue
        hint, optional = _strip_optional(hints[field.name])
        bound, inner = _bound(hint)
        if bound is not None and not bound.holds(value):
            raise ConfigError(f"{dotted} must be {bound}{' or null' if optional else ''}, got {value}")
        item_bound = _bound(typing.get_args(inner)[0])[0] if typing.get_origin(inner) is tuple else None
        for i, item in enumerate(value if item_bound else ()):
            if not item_bound.holds(item):
                raise ConfigError(f"{dotted}[{i}] must be {item_bound}, got {item}")
        if dataclasses.is_dataclass(value):
            check_bounds(value, dotted)


def _strip_optional(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); anything else -> (hint, False)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], True
    return hint, False


def _bound(hint: Any) -> tuple[Bound | None, Any]:
    """The Bound in `Annotated[X, Bound(...)]` (or None) and X."""
    if typing.get_origin(hint) is Annotated:
        inner, *extras = typing.get_args(hint)
        return next((e for e in extras if isinstance(e, Bound)), None), inner
    return None, hint


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
            raise ConfigError(unknown(f"{key}.{name}", str(name), list(fields), prefix=key))
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
            raise ConfigError(unknown(value, key, [str(a) for a in args], what="value"))
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


def unknown(given: Any, key: str, valid: list[str], *, prefix: str = "", what: str = "key") -> str:
    """The message for an unknown key or value, naming the closest valid one when there is one."""
    close = difflib.get_close_matches(str(given).rsplit(".", 1)[-1], valid, n=1, cutoff=0.5)
    if what == "value":
        msg = f"{key}: unknown value {given!r}, expected one of {valid}"
        return msg + (f" (did you mean {close[0]!r}?)" if close else "")
    msg = f"unknown key '{given}'"
    if close:
        return msg + f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return msg + f"; valid keys{' in ' + prefix if prefix else ''}: {', '.join(valid)}"


def read_yaml(path: Path) -> dict[str, Any]:
    """The mapping of sections in YAML file `path` ({} for an empty file)."""
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


def compose(paths: list[Path]) -> dict[str, Any]:
    """The mapping `paths` give merged in order, each file after the bases its `defaults:` lists."""
    merged: dict[str, Any] = {}
    for path in paths:
        merge(merged, _compose_file(Path(path), ()))
    return merged


def _compose_file(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """`path`'s bases merged in their listed order, then `path`'s own keys; `chain` is the files that
    include it (a cycle through them is refused)."""
    here = path.resolve()
    if here in chain:
        cycle = " -> ".join(str(p) for p in (*chain[chain.index(here) :], here))
        raise ConfigError(f"config files include each other: {cycle}; remove one from its defaults list")
    raw = read_yaml(path)
    listed = [key for key in BASE_KEYS if key in raw]
    if len(listed) > 1:
        raise ConfigError(f"{path}: list its bases under one of defaults: or base:, not both")
    bases = raw.pop(listed[0]) if listed else []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: {listed[0]} must be a list of config files relative to it, got {bases!r}")
    merged: dict[str, Any] = {}
    for name in bases:
        merge(merged, _compose_file(_base_path(path, name), (*chain, here)))
    merge(merged, raw)
    return merged


def _base_path(path: Path, name: str) -> Path:
    """`name` relative to the folder of `path`, which lists it; `.yaml` may be left out, as in Hydra."""
    base = path.parent / name
    if not base.suffix:
        base = base.with_name(base.name + ".yaml")
    if not base.is_file():
        raise ConfigError(
            f"{path}: base config '{name}' not found at {base}; list files relative to {path.parent}"
        )
    return base


def merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    """Merge `other` into `into`: mappings key by key, anything else (a value, a list, null) replaces."""
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def apply_override(raw: dict[str, Any], item: str) -> None:
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
