"""Config composition: `defaults:`/`base:` lists resolved relative to the file, several `--config` files
merged in order, cycles and missing bases refused in one line, `--print-config`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load, to_dict
from pipeline.schema import BASE_KEYS, ConfigError, compose

ROOT = Path(__file__).resolve().parents[1]
SHARDS = ["data.train_shards=x", "data.val_shards=x"]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _leaves(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_bases_merge_in_order_then_the_file_mappings_deep_lists_and_null_replace(tmp_path: Path) -> None:
    _write(tmp_path / "b/one.yaml", "data: {batch_size: 8, augment: {blur_p: [0.5, 0.1], hue: 0.1}}\nx: 1\n")
    _write(tmp_path / "b/two.yaml", "data: {batch_size: 16, val_shards: v}\ny: [1, 2]\n")
    _write(tmp_path / "top.yaml", "defaults: [b/one.yaml, b/two]\ndata: {augment: {blur_p: [0.0]}}\n")
    top2 = _write(tmp_path / "top2.yaml", "base: top.yaml\ndata: {val_shards: null}\ny: [3]\n")
    assert compose([top2]) == {
        "data": {"batch_size": 16, "augment": {"blur_p": [0.0], "hue": 0.1}, "val_shards": None},
        "x": 1,
        "y": [3],
    }


def test_several_configs_merge_in_order_the_last_winning(tmp_path: Path) -> None:
    debug = ROOT / "configs" / "debug.yaml"
    cluster = _write(tmp_path / "cluster.yaml", "data: {batch_size: 32}\ntrain: {max_steps: 9}\n")
    cfg = load([debug, cluster], SHARDS)
    assert (cfg.data.batch_size, cfg.train.max_steps, cfg.method.name) == (32, 9, "simclr")
    assert load([cluster, debug], SHARDS).data.batch_size == 16  # the order matters
    assert load([debug, cluster], [*SHARDS, "data.batch_size=4"]).data.batch_size == 4  # then overrides


def test_bases_resolve_relative_to_the_listing_file_not_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    top = _write(tmp_path / "mine" / "top.yaml", "defaults: [../lower/mid.yaml]\n")
    _write(tmp_path / "lower" / "mid.yaml", "defaults: [leaf]\n")  # lower/leaf.yaml, `.yaml` left out
    _write(tmp_path / "lower" / "leaf.yaml", "x: from lower\n")
    _write(tmp_path / "mine" / "leaf.yaml", "x: a decoy in the working dir\n")
    monkeypatch.chdir(tmp_path / "mine")
    assert compose([Path("top.yaml")]) == {"x": "from lower"}
    assert compose([top]) == {"x": "from lower"}


def test_cycles_missing_and_malformed_bases_are_refused_in_one_line(tmp_path: Path) -> None:
    a = _write(tmp_path / "a.yaml", "defaults: [b.yaml]\n")
    _write(tmp_path / "b.yaml", "defaults: [sub/c.yaml]\n")
    _write(tmp_path / "sub/c.yaml", "defaults: [../a.yaml]\n")
    with pytest.raises(ConfigError) as err:
        compose([a])
    message = str(err.value)
    assert "\n" not in message and message.startswith("config files include each other: ")
    assert message.count("a.yaml") == 2 and "b.yaml" in message and "remove one" in message
    self_loop = _write(tmp_path / "self.yaml", "base: self\n")
    with pytest.raises(ConfigError, match=r"include each other: .*self.yaml -> .*self.yaml"):
        compose([self_loop])

    missing = _write(tmp_path / "m.yaml", "defaults: [base/nope.yaml]\n")
    with pytest.raises(ConfigError) as err:
        compose([missing])
    assert str(err.value) == (
        f"{missing}: base config 'base/nope.yaml' not found at {tmp_path / 'base/nope.yaml'}; "
        f"list files relative to {tmp_path}"
    )
    both = _write(tmp_path / "both.yaml", "defaults: [a.yaml]\nbase: [b.yaml]\n")
    with pytest.raises(ConfigError, match=r"both.yaml: list its bases under one of defaults: or base:"):
        compose([both])
    hydra_group = _write(tmp_path / "group.yaml", "defaults:\n  - dataset: cifar10\n")
    with pytest.raises(
        ConfigError, match=r"group.yaml: defaults must be a list of config files relative to it"
    ):
        compose([hydra_group])


def test_a_typo_in_a_base_still_names_the_closest_key(tmp_path: Path) -> None:
    base = _write(tmp_path / "base.yaml", "trian: {epochs: 2}\n")
    top = _write(tmp_path / "top.yaml", f"defaults: [base.yaml, {ROOT / 'configs' / 'debug.yaml'}]\n")
    with pytest.raises(ConfigError, match=r"unknown key 'trian' \(did you mean 'train'\?\)"):
        load(top, SHARDS)
    assert base.exists()


def test_cli_merges_repeated_config_and_prints_the_resolved_yaml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.train import main

    cluster = _write(tmp_path / "cluster.yaml", "data: {num_workers: 3}\n")
    argv = ["--config", str(ROOT / "configs" / "cifar10_simclr_hard.yaml"), "--config", str(cluster)]
    assert main([*argv, "--print-config", *SHARDS, "train.epochs=7"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load([argv[1], cluster], [*SHARDS, "train.epochs=7"]))
    assert printed["method"]["negatives"] == "hard" and printed["data"]["num_workers"] == 3
    assert printed["data"]["augment"]["crop_scale"] == [0.08, 1.0]  # from base/cifar10_simclr_views.yaml

    cycle = _write(tmp_path / "loop.yaml", "base: loop.yaml\n")
    assert main(["--config", str(cycle), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: config files include each other")


def test_print_config_runs_nothing_and_imports_no_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pipeline.train import main\n"
        f"argv = ['--config', 'configs/cifar10_dino.yaml', '--print-config', 'run.output_dir={tmp_path}/r']\n"
        "status = main(argv)\n"
        "print(status, sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"
    assert "name: dino" in out.stdout and not (tmp_path / "r").exists()


SHIPPED = sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_each_shipped_file_says_only_what_differs_from_its_bases(path: Path) -> None:
    """A method file lists a base and no line that repeats the value the base already gives."""
    own = yaml.safe_load(path.read_text())
    listed = [own.pop(key) for key in BASE_KEYS if key in own]
    if not listed:
        assert path.name == "debug.yaml", f"{path.name} has no base"  # the tests' own, whole in one file
        return
    bases = [listed[0]] if isinstance(listed[0], str) else listed[0]
    based = _leaves(compose([path.parent / b for b in bases]))
    same = sorted(k for k, v in _leaves(own).items() if k in based and based[k] == v)
    assert same == [], f"{path.name} repeats its base's values for {same}"
    load(path, SHARDS)  # and composes into a valid config
