"""Training under changed configs, damaged checkpoints, full or read-only disks and a second run in the
same folder: what may change on resume is applied (batch size: from the samples consumed), what may not
is refused in one line with exit 2 before anything is written, and nothing is lost.

Real runs of the debug config in this process (`_train_here`), real tmpfs mounts, a real second process.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from test_train import ROOT, _env, _overrides, _tiny, _train_cmd, _train_here, _wait_for

from run_outputs import step_rows

NO_WANDB = "logging.wandb.mode=disabled"


@pytest.fixture(scope="module")
def tiny(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """96 labelled images: 6 steps of 16 or 12 steps of 8 per epoch."""
    return _tiny(sample_dir, "train", 32, tmp_path_factory)


@contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real small filesystem at `path` (needs root / CAP_SYS_ADMIN; skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def _last_err_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def test_batch_size_halved_on_resume_continues_from_the_samples_consumed(
    tiny: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """16 -> 8 mid-epoch (was: StopIteration, and config.yaml already overwritten). 4 steps of 16 are 64
    samples: 4 batches of 8 are left in the epoch; the lr schedule continues at 8/12 of the run, not at
    step 4 of 12; the change is printed and the previous config kept."""
    out = tmp_path / "run"
    common = _overrides(tiny, sample_val_shards, out, NO_WANDB, "checkpoint.every_steps=2")
    assert _train_here([*common, "train.max_steps=4"]) == 0
    capsys.readouterr()
    assert _train_here([*common, "train.max_steps=null", "data.batch_size=8", "optim.lr=0.1"]) == 0
    stdout = capsys.readouterr().out
    assert "resume: data.batch_size: 16 -> 8" in stdout and "resume: optim.lr: 0.05 -> 0.1" in stdout
    rows = step_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 9)) and {r["epoch"] for r in rows} == {0}
    peak = 0.1 * 8 / 256  # linear scaling from reference_batch_size 256
    assert math.isclose(rows[4]["lr"], peak * 0.5 * (1 + math.cos(math.pi * 8 / 12)), rel_tol=1e-9)
    state = torch.load(out / "checkpoints" / "step-00000008" / "state.pt", weights_only=False)
    assert [(s["epoch"], s["batches_consumed"], s["batch_size"]) for s in state["loader"]] == [(0, 12, 8)]
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["batch_size"] == 8
    assert yaml.safe_load((out / "config.until-step-00000004.yaml").read_text())["data"]["batch_size"] == 16


def test_resume_refuses_keys_that_change_what_is_learned_and_a_finished_schedule(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    common = _overrides(sample_shards, sample_val_shards, out, NO_WANDB, "train.max_steps=4")
    assert _train_here(common) == 0
    config_before = (out / "config.yaml").read_text()
    metrics_before = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert _train_here([*common, "method.temperature=0.5"]) == 2
    line = _last_err_line(capsys)
    assert "method.temperature is 0.2 there, 0.5 here" in line and "a new run.output_dir" in line
    assert _train_here([*common, "train.max_steps=2"]) == 2  # was: exit 0 having done nothing
    line = _last_err_line(capsys)
    assert "is at step 4, past this run's end at step 2" in line and "raise train.epochs" in line
    assert (out / "config.yaml").read_text() == config_before  # nothing written by a refused resume
    assert (out / "metrics.jsonl").read_text() == metrics_before
    assert not list(out.glob("config.until-*"))


def test_checkpoint_from_an_older_config_schema_resumes(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """A key the checkpoint's config lacks takes its default; a key this version dropped is ignored and
    said so; an unknown Progress field is ignored too."""
    import hashlib

    out = tmp_path / "run"
    common = _overrides(sample_shards, sample_val_shards, out, NO_WANDB, "checkpoint.every_steps=2")
    assert _train_here([*common, "train.max_steps=2"]) == 0
    step_dir = out / "checkpoints" / "step-00000002"
    state = torch.load(step_dir / "state.pt", weights_only=False)
    del state["config"]["optim"]["eps"], state["config"]["method"]["chunk_size"]
    state["config"]["train"]["retired_key"] = 1
    state["progress"]["retired_field"] = 0
    torch.save(state, step_dir / "state.pt")
    (step_dir / "state.sha256").write_text(hashlib.sha256((step_dir / "state.pt").read_bytes()).hexdigest())
    capsys.readouterr()
    assert _train_here([*common, "train.max_steps=4"]) == 0
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "resume: train.retired_key: no longer a config key, ignored" in stdout
    assert "optim.eps" not in stdout and "chunk_size" not in stdout  # defaults: nothing changed
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3, 4]


def test_shard_deleted_between_epochs_stops_in_one_line_and_resumes_once_back(
    tiny: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Epoch 1 checkpointed, then a shard disappears (was: a traceback from the loader's workers): one
    line naming the shard, exit 2, the checkpoint intact; with the shard back the run finishes epoch 2."""
    import shutil

    shards = Path(shutil.copytree(tiny, tmp_path / "shards"))
    out = tmp_path / "run"
    workers = "data.num_workers=1"  # the error crosses a DataLoader worker, as in a real run
    common = _overrides(shards, sample_val_shards, out, NO_WANDB, "train.max_steps=null", workers)
    assert _train_here([*common, "train.epochs=1"]) == 0  # 6 steps of 16
    gone = shards / "train-000001.tar"
    kept = gone.rename(tmp_path / gone.name)
    capsys.readouterr()
    assert _train_here([*common, "train.epochs=2"]) == 2
    line = _last_err_line(capsys)
    assert line.startswith("error: ") and f"{gone} no longer exists" in line and "resume" in line
    assert (out / "checkpoints" / "step-00000006" / "state.pt").exists()
    kept.rename(gone)
    assert _train_here([*common, "train.epochs=2"]) == 0
    assert [r["step"] for r in step_rows(out)][-1] == 12


def test_damaged_newest_checkpoint_falls_back_to_the_newest_intact(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    """Truncated newest state.pt: training, eval and export use the older intact step with a one-line
    warning; with every step damaged they refuse in one line with exit 2."""
    from pipeline.eval.__main__ import main as eval_main
    from pipeline.export import main as export_main

    out = tmp_path / "run"
    common = _overrides(sample_shards, sample_val_shards, out, NO_WANDB, "checkpoint.every_steps=2")
    common += ["checkpoint.keep_last=3"]
    assert _train_here([*common, "train.max_steps=4"]) == 0
    ckpts = out / "checkpoints"
    newest = ckpts / "step-00000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()

    exported = tmp_path / "export" / "backbone.pt"
    exported.parent.mkdir()  # export creates no folders (tests/test_export_hub.py)
    assert export_main(["--checkpoint", str(out), "--format", "timm", "--out", str(exported)]) == 0
    assert "checkpoint step-00000004 is damaged" in capsys.readouterr().err and exported.exists()
    assert _train_here([*common, "train.max_steps=6"]) == 0
    captured = capsys.readouterr()
    assert "warning: checkpoint step-00000004 is damaged" in captured.err
    assert (
        "using step-00000002 instead" in captured.err
        and f"resumed from {ckpts}/step-00000002" in captured.out
    )
    assert [r["step"] for r in step_rows(out)] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 redone

    for step_dir in ckpts.glob("step-*"):
        (step_dir / "state.pt").write_bytes(b"PK\x03\x04 truncated")
    assert _train_here([*common, "train.max_steps=8"]) == 2
    assert "no intact checkpoint under" in _last_err_line(capsys)
    assert eval_main(["knn", "--checkpoint", str(out), "--out", str(tmp_path / "e")]) == 2
    assert "no intact checkpoint under" in _last_err_line(capsys)
    explicit = str(ckpts / "step-00000006")
    assert export_main(["--checkpoint", explicit, "--format", "timm", "--out", str(exported)]) == 2
    assert "checkpoint step-00000006 is damaged" in _last_err_line(capsys)
    assert eval_main(["knn", "--checkpoint", str(tmp_path / "nowhere")]) == 2
    assert "no checkpoint" in _last_err_line(capsys)


def test_full_or_read_only_checkpoint_location_is_refused_before_the_first_step(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    with tmpfs(tmp_path / "small", "1m") as small:  # the tiny model's checkpoint needs ~4 MiB
        common = _overrides(sample_shards, sample_val_shards, out, NO_WANDB, f"checkpoint.dir={small}")
        assert _train_here(common) == 2
        line = _last_err_line(capsys)
        assert f"checkpoint.dir {small} has" in line and "MiB free" in line
        assert list(small.iterdir()) == []  # the probe is gone
    assert not (out / "metrics.jsonl").exists()  # refused before the first step
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as ro:
        assert (
            _train_here(_overrides(sample_shards, sample_val_shards, out, NO_WANDB, f"checkpoint.dir={ro}"))
            == 2
        )
        assert f"checkpoint.dir {ro} is not writable (EROFS: Read-only file system)" in _last_err_line(capsys)
    with tmpfs(tmp_path / "ro_run", "1m", read_only=True) as ro_run:
        assert _train_here(_overrides(sample_shards, sample_val_shards, ro_run / "run", NO_WANDB)) == 2
        assert f"run.output_dir {ro_run / 'run'} is not writable" in _last_err_line(capsys)


def test_disk_full_at_save_names_enospc_and_leaves_no_temporary(tmp_path: Path):
    """Past the preflight (another writer filled the disk): one line naming the path and ENOSPC."""
    from pipeline.engine.checkpoint import CheckpointError, CheckpointStore

    with tmpfs(tmp_path / "full", "1m") as full:
        store = CheckpointStore(str(full))
        store.save(1, {"w": torch.zeros(1000)})
        with pytest.raises(CheckpointError, match=r"cannot write checkpoint .*step-00000002: ENOSPC"):
            store.save(2, {"w": torch.zeros(1 << 19)})  # 2 MiB
        assert sorted(p.name for p in full.iterdir()) == ["latest", "step-00000001"]
        assert store.newest_intact()[1]["w"].shape == (1000,)


@pytest.mark.slow  # a second training process
def test_second_training_into_the_same_run_folder_is_refused_until_the_first_dies(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    common = _overrides(sample_shards, sample_val_shards, out, NO_WANDB, "checkpoint.every_steps=1")
    first = subprocess.Popen(
        _train_cmd([*common, "train.max_steps=100000"]), cwd=ROOT, env=_env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), first)
        metrics_before = (out / "metrics.jsonl").read_text()
        assert _train_here([*common, "train.max_steps=3"]) == 2
        line = _last_err_line(capsys)
        assert f"run.output_dir {out} is in use by another training (pid {first.pid} on host" in line
        assert (out / "metrics.jsonl").read_text().startswith(metrics_before)  # nothing of ours mixed in
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The kernel dropped the dead holder's lock: the next run resumes without any cleaning up.
    steps = [r["step"] for r in step_rows(out)]
    assert _train_here([*common, f"train.max_steps={max(steps) + 1}"]) == 0
    assert f"resumed from {out}/checkpoints/step-" in capsys.readouterr().out


def test_nan_stop_without_a_checkpoint_says_so_and_metrics_are_strict_json(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "run"
    extra = ["optim.lr=1e30", "train.max_bad_steps=2", "train.max_steps=20", "checkpoint.every_steps=null"]
    assert _train_here(_overrides(sample_shards, sample_val_shards, out, NO_WANDB, *extra)) == 1
    assert "no checkpoint was written before it" in _last_err_line(capsys)

    def refuse(token: str) -> None:
        raise ValueError(f"not strict JSON: {token}")

    rows = [
        json.loads(line, parse_constant=refuse) for line in (out / "metrics.jsonl").read_text().splitlines()
    ]
    assert rows[-1]["loss"] is None and rows[-1]["bad_steps"] == 2


@pytest.mark.slow  # a training process that starts W&B's service
def test_wandb_online_with_a_bad_key_and_no_network_fails_fast(
    sample_shards: Path, sample_val_shards: Path, tmp_path: Path
):
    out = tmp_path / "run"
    cmd = _train_cmd(_overrides(sample_shards, sample_val_shards, out, "logging.wandb.mode=online"))
    env = _env(WANDB_INIT_TIMEOUT="1", WANDB_DIR=str(tmp_path))
    env["WANDB_API_KEY"] = uuid.uuid4().hex + "00000000"  # 40 characters, not a real key
    env["WANDB_BASE_URL"] = "http://127.0.0.1:9"  # nothing listens on the discard port: no network
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: logging.wandb.mode=online: W&B did not start") and "offline" in last
    assert "Traceback" not in proc.stderr
    assert not step_rows(out)  # before the first step


def test_eval_and_export_refuse_an_unwritable_out_before_any_work(tmp_path: Path, capsys):
    from pipeline.eval.__main__ import main as eval_main
    from pipeline.export import main as export_main

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    missing = str(tmp_path / "no-run")  # never opened: --out is checked first
    assert eval_main(["knn", "--checkpoint", missing, "--out", str(blocker / "eval")]) == 2
    assert f"--out {blocker / 'eval'} is not writable (Not a directory)" in _last_err_line(capsys)
    assert export_main(["--checkpoint", missing, "--out", str(blocker / "r.pt")]) == 2
    assert f"--out {blocker / 'r.pt'} is not writable (Not a directory)" in _last_err_line(capsys)
