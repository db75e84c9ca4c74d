"""Config loading: generic dataclass building, overrides, errors that name the key, and the real configs."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from pipeline.config import Config, load
from pipeline.engine.config import CheckpointConfig, LoggingConfig, TrainConfig
from pipeline.methods.config import METHOD_CONFIGS
from pipeline.schema import Bound, ConfigError, apply_override, build, to_dict

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Head:
    hidden_dim: int = 8
    batch_norm: bool = True


@dataclass(frozen=True)
class Section:
    name: Literal["a", "b"]
    lr: float = 0.1
    size: tuple[int, int] = (1, 2)
    crops: tuple[float, ...] = ()
    head: Head = field(default_factory=Head)
    predictor: Head | None = None
    note: str | None = None
    extra: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"sec.lr must be > 0, got {self.lr}")


def test_build_converts_nested_types() -> None:
    raw = {
        "name": "b",
        "lr": 1,
        "size": [3, 4],
        "crops": [0.5, "1e-3"],
        "head": {"hidden_dim": 16},
        "predictor": {"batch_norm": False},
        "extra": {"k": 2},
    }
    sec = build(Section, raw, "sec")
    assert sec == Section(
        name="b",
        lr=1.0,
        size=(3, 4),
        crops=(0.5, 0.001),
        head=Head(16),
        predictor=Head(8, False),
        extra={"k": 2},
    )
    assert isinstance(sec.lr, float)
    assert build(Section, {"name": "a", "predictor": None}, "sec").predictor is None


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"name": "a", "lrr": 0.1}, "unknown key 'sec.lrr' (did you mean 'sec.lr'?)"),
        (
            {"name": "a", "head": {"hiden_dim": 3}},
            "unknown key 'sec.head.hiden_dim' (did you mean 'sec.head.hidden_dim'?)",
        ),
        ({"name": "c"}, "sec.name: unknown value 'c'"),
        ({"name": "a", "lr": "fast"}, "sec.lr must be a number, got str 'fast'"),
        ({"name": "a", "head": {"hidden_dim": 2.5}}, "sec.head.hidden_dim must be an integer"),
        ({"name": "a", "head": {"batch_norm": "yes"}}, "sec.head.batch_norm must be true or false"),
        ({"name": "a", "size": [1]}, "sec.size must have 2 items"),
        ({"name": "a", "lr": -1.0}, "sec.lr must be > 0"),
        ({"lr": 1.0}, "missing required key 'sec.name'"),
        ({"name": "a", "head": 3}, "sec.head must be a mapping"),
        ({"name": "a", "note": 5}, "sec.note must be a string, got int 5"),
        ({"name": "a", "predictor": {"hiden_dim": 3}}, "did you mean 'sec.predictor.hidden_dim'?"),
    ],
)
def test_build_errors_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build(Section, raw, "sec")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_overrides_parse_yaml_values() -> None:
    raw: dict = {"train": {"epochs": 1}}
    for item in ["train.epochs=3", "train.grad_clip=null", "train.sync_bn=true", "logging.wandb.tags=[a, b]"]:
        apply_override(raw, item)
    assert raw == {
        "train": {"epochs": 3, "grad_clip": None, "sync_bn": True},
        "logging": {"wandb": {"tags": ["a", "b"]}},
    }
    with pytest.raises(ConfigError, match=r"key.sub=value"):
        apply_override(raw, "train.epochs")
    with pytest.raises(ConfigError, match=r"'train.epochs' is not a section"):
        apply_override(raw, "train.epochs.x=1")


def test_engine_sections_validate() -> None:
    assert build(TrainConfig, {"engine": "deepspeed", "grad_clip": 1}, "train").grad_clip == 1.0
    with pytest.raises(ConfigError, match=r"train.grad_accum_steps must be >= 1"):
        build(TrainConfig, {"grad_accum_steps": 0}, "train")
    with pytest.raises(ConfigError, match=r"did you mean 'train.engine'"):
        build(TrainConfig, {"engin": "ddp"}, "train")
    with pytest.raises(ConfigError, match=r"train.sync_bn is supported with train.engine=ddp only"):
        build(TrainConfig, {"engine": "deepspeed", "sync_bn": True}, "train")
    logging = build(LoggingConfig, {"wandb": {"mode": "disabled", "tags": ["x"]}}, "logging")
    assert logging.wandb.tags == ("x",) and logging.wandb.mode == "disabled"
    with pytest.raises(
        ConfigError, match=r"logging.wandb.mode: unknown value 'onlin'.*did you mean 'online'"
    ):
        build(LoggingConfig, {"wandb": {"mode": "onlin"}}, "logging")
    assert build(CheckpointConfig, {"every_steps": None}, "checkpoint").every_steps is None


DEBUG_OVERRIDES = ["data.train_shards=/tmp/none", "data.val_shards=/tmp/none", "run.output_dir=/tmp/none"]


@pytest.mark.parametrize("name", ["debug", "imagenet_simclr", "imagenet_mocov2"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load(ROOT / "configs" / f"{name}.yaml", DEBUG_OVERRIDES if name == "debug" else [])
    again = load(None, [f"{k}={v}" for k, v in _flatten(to_dict(cfg))])
    assert again == cfg  # to_dict round-trips through overrides


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, str]]:
    import json

    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", json.dumps(v)))
    return out


def test_whole_config_errors() -> None:
    path = ROOT / "configs" / "debug.yaml"
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load(path, [*DEBUG_OVERRIDES, "trian.epochs=2"])
    with pytest.raises(ConfigError, match=r"method.name: unknown value 'simclrr'.*did you mean 'simclr'"):
        load(path, [*DEBUG_OVERRIDES, "method.name=simclrr"])
    with pytest.raises(ConfigError, match=r"optim.name=lars cannot run under ZeRO stage 1"):
        load(path, [*DEBUG_OVERRIDES, "train.engine=deepspeed", "optim.name=lars"])


def test_cli_reports_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.train import main

    argv = ["--config", str(ROOT / "configs" / "debug.yaml"), *DEBUG_OVERRIDES, "train.epochs=zero"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "config error: train.epochs must be an integer, got str 'zero'"


@pytest.mark.parametrize(
    ("key", "raw", "message"),
    [
        ("train", {"epochs": 0}, "train.epochs must be >= 1, got 0"),
        ("train", {"max_steps": 0}, "train.max_steps must be >= 1 or null, got 0"),
        ("train", {"grad_clip": 0}, "train.grad_clip must be > 0 or null, got 0.0"),
        ("optim", {"momentum": 1}, "optim.momentum must be in [0, 1), got 1.0"),
        ("optim", {"lr": float("nan")}, "optim.lr must be > 0, got nan"),
        ("model", {"projector": {"num_layers": 0}}, "model.projector.num_layers must be >= 1, got 0"),
        ("model", {"predictor": {"hidden_dim": 0}}, "model.predictor.hidden_dim must be > 0, got 0"),
        ("data", {"augment": {"hue": 0.6}}, "data.augment.hue must be in [0, 0.5] or null, got 0.6"),
        ("data", {"augment": {"blur_p": [0.5, 2]}}, "data.augment.blur_p[1] must be in [0, 1], got 2.0"),
        ("method", {"name": "triplet", "margin": 3}, "method.margin must be in (0, 2], got 3.0"),
    ],
)
def test_bounds_fail_in_one_line_naming_the_key(key: str, raw: dict, message: str) -> None:
    cls = METHOD_CONFIGS[raw["name"]] if key == "method" else HINTS[key]
    with pytest.raises(ConfigError) as err:
        build(cls, {"train_shards": "x", **raw} if key == "data" else raw, key)
    assert str(err.value) == message


def _bounded_fields(cls: type, key: str) -> list[tuple[str, Bound, type]]:
    """(dotted key, bound, number type) of every bounded field of `cls` and of the dataclasses in it."""
    out = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls, include_extras=True)[f.name]
        if typing.get_origin(hint) in (typing.Union, type(int | None)):
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if typing.get_origin(hint) is typing.Annotated:
            number, *extras = typing.get_args(hint)
            out += [(f"{key}.{f.name}", e, number) for e in extras if isinstance(e, Bound)]
        elif dataclasses.is_dataclass(hint):
            out += _bounded_fields(hint, f"{key}.{f.name}")
    return out


HINTS = typing.get_type_hints(Config)
SECTIONS = [(k, HINTS[k]) for k in HINTS if k != "method"] + [("method", c) for c in METHOD_CONFIGS.values()]


@pytest.mark.parametrize(("key", "cls"), SECTIONS)
def test_every_declared_bound_is_enforced_for_yaml_and_python(key: str, cls: type) -> None:
    """A section that overrides __post_init__ without calling super() would skip its bounds: caught here."""
    required = {"run": {"name": "x", "output_dir": "x"}, "data": {"train_shards": "x"}}.get(key, {})
    for dotted, bound, number in _bounded_fields(cls, key):
        low = bound.ge - 1 if bound.ge is not None else bound.gt
        value = number(low if low is not None else (bound.le + 1 if bound.le is not None else bound.lt))
        raw = dict(required)
        node = raw
        for part in dotted.split(".")[1:-1]:
            node = node.setdefault(part, {})
        node[dotted.rsplit(".", 1)[-1]] = value
        with pytest.raises(
            ConfigError, match=rf"^{dotted.replace('.', '[.]')} must be {re.escape(str(bound))}"
        ):
            build(cls, raw, key)
        if "." not in dotted[len(key) + 1 :]:  # a direct field: Python construction checks it too
            with pytest.raises(ConfigError, match=rf"^{dotted.replace('.', '[.]')} must be"):
                cls(**raw)


def test_loading_every_shipped_config_imports_no_torch() -> None:
    """Validating a config, as `python -m pipeline.train` does first, must not pay for torch, timm, DALI."""
    code = (
        "import sys, glob\n"
        "from pipeline.config import load\n"
        "for path in sorted(glob.glob('configs/*.yaml')):\n"
        "    load(path, ['data.train_shards=x', 'data.val_shards=x'])\n"
        "heavy = ('torch', 'torchvision', 'timm', 'numpy', 'nvidia.dali', 'deepspeed')\n"
        "from pipeline.train import main\n"  # its refusal of a bad key comes before any heavy import
        "assert main(['--config', 'configs/debug.yaml', 'data.train_shards=x', 'train.epochs=0']) == 2\n"
        "print(len(glob.glob('configs/*.yaml')), sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded, heavy = out.stdout.split(" ", 1)
    assert int(loaded) >= 10 and heavy.strip() == "[]"
