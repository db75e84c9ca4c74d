"""launch/torchrun.sh, launch/entrypoint.sh, launch/slurm.sbatch and the Dockerfile.

The runs are real: torchrun with 2 gloo processes training the debug config from the sample shards. The
SLURM test replaces only SLURM's own commands (srun, scontrol, scancel) with small scripts that start one
task per "node" on this machine, so the batch script's rendezvous, SIGTERM and requeue logic run as written.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ports import free_port
from run_outputs import checkpoint_step, world_size_of

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SH = ROOT / "launch" / "torchrun.sh"
VENV_BIN = Path(sys.executable).parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PET_", "WANDB_API"))}
    for key in ("NNODES", "NPROC_PER_NODE", "RDZV_ENDPOINT", "RDZV_ID", "RDZV_CONF", "MAX_RESTARTS"):
        env.pop(key, None)
    env.pop("TRAIN_MODULE", None)
    env.update(PATH=f"{VENV_BIN}:{env['PATH']}", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--config", "configs/debug.yaml", f"data.train_shards={shards}", f"run.output_dir={out}",
        "logging.progress_bar=false", *extra,
    ]  # fmt: skip


def _dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(TORCHRUN_SH), "--dry-run", "--config", "c.yaml", "a.b=1"],
        env=_env(**env), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_hadolint_passes() -> None:
    proc = subprocess.run(
        [str(VENV_BIN / "hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_shape() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:13\.\S+$", text, re.M)
    assert re.search(r"^USER [1-9][0-9]*:[0-9]+$", text, re.M), "numeric non-root user (runAsNonRoot)"
    assert 'ENTRYPOINT ["/app/launch/entrypoint.sh"]' in text
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for source in re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", text, re.M):
        for name in source.split():
            assert (ROOT / name).exists() and name not in ignored, name
    assert {".venv", ".git", "tests", "runs"} <= ignored


def test_help_lists_every_setting_with_its_default() -> None:
    proc = subprocess.run([str(TORCHRUN_SH), "--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0
    for name, default in [
        ("NNODES", "(1)"), ("NPROC_PER_NODE", "nvidia-smi"), ("RDZV_ENDPOINT", "--standalone"),
        ("RDZV_ID", "ssl-pretrain"), ("MAX_RESTARTS", "(3 with a rendezvous, 0 standalone)"),
        ("RESTART_WINDOW", "(3600)"), ("RESTART_BACKOFF", "(30)"), ("TRAIN_MODULE", "(pipeline.train)"),
    ]:  # fmt: skip
        line = next(line for line in proc.stdout.splitlines() if line.strip().startswith(name))
        assert default in line, line


def test_command_lines() -> None:
    single = _dry_run(NPROC_PER_NODE="4")
    assert single.stdout.split() == [
        "torchrun", "--nproc-per-node=4", "--standalone", "--max-restarts=0", "-m", "pipeline.train",
        "--config", "c.yaml", "a.b=1",
    ]  # fmt: skip
    multi = _dry_run(NNODES="2:4", NPROC_PER_NODE="8", RDZV_ENDPOINT="node0:29400", RDZV_ID="job7")
    assert multi.stdout.split()[1:7] == [
        "--nproc-per-node=8", "--nnodes=2:4", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29400",
        "--rdzv-id=job7", "--rdzv-conf=join_timeout=900",
    ]  # fmt: skip
    assert "--max-restarts=0" in multi.stdout.split()  # the script restarts torchrun itself
    # an Indexed Job's pod 0 hosts the rendezvous store, the other pods never do
    pod0 = _dry_run(NNODES="2", RDZV_ENDPOINT="job-0.job:29400", JOB_COMPLETION_INDEX="0")
    pod1 = _dry_run(NNODES="2", RDZV_ENDPOINT="job-0.job:29400", JOB_COMPLETION_INDEX="1")
    assert "--rdzv-conf=join_timeout=900,is_host=true" in shlex.split(pod0.stdout)
    assert "--rdzv-conf=join_timeout=900,is_host=false" in shlex.split(pod1.stdout)
    # the Kubeflow operator's PET_* variables are the defaults
    pet = _dry_run(PET_NNODES="1:3", PET_NPROC_PER_NODE="2", PET_RDZV_ENDPOINT="job-worker-0:29400")
    assert "--nnodes=1:3" in pet.stdout and "--rdzv-endpoint=job-worker-0:29400" in pet.stdout
    missing = _dry_run(NNODES="2")
    assert missing.returncode == 2 and "RDZV_ENDPOINT" in missing.stderr


def test_entrypoint_runs_other_commands_as_given() -> None:
    proc = subprocess.run(
        [str(ROOT / "launch" / "entrypoint.sh"), "python", "-c", "import os; print(os.getcwd())"],
        env=_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == str(ROOT)


@pytest.mark.slow  # torchrun and two trainers, each a fresh interpreter importing torch
def test_torchrun_sh_trains_with_two_processes(sample_shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [str(TORCHRUN_SH), *_train_args(sample_shards, out, "train.max_steps=1")],
        cwd=ROOT, env=_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "--nproc-per-node=2 --standalone" in proc.stderr
    assert world_size_of(out) == 2
    assert checkpoint_step(out) == 1


def test_restarts_are_budgeted_and_backed_off(tmp_path: Path) -> None:
    """A torchrun that fails before any trainer reports (a rendezvous that cannot form) is started again
    MAX_RESTARTS times, with a growing pause, then the script gives up with the retryable exit 138."""
    proc = subprocess.run(
        [str(TORCHRUN_SH), "--config", "c.yaml"],
        env=_env(NNODES="2", RDZV_ENDPOINT="127.0.0.1:9", MAX_RESTARTS="2", RESTART_BACKOFF="1",
                 TORCHRUN="false"),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 138, proc.stderr
    assert "restart 1 of 2 in 3600s after: torchrun exited 1 without a trainer error" in proc.stderr
    assert "restart 2 of 2" in proc.stderr
    assert "2 restarts within 3600s (MAX_RESTARTS): giving up, exit 138" in proc.stderr
    assert "starting again in 1s" in proc.stderr and "starting again in 2s" in proc.stderr


def test_sigterm_during_back_off_exits_at_once(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [str(TORCHRUN_SH), "--config", "c.yaml"],
        env=_env(NNODES="2", RDZV_ENDPOINT="127.0.0.1:9", RESTART_BACKOFF="300", TORCHRUN="false"),
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        line = ""
        while "starting again in 300s" not in line:
            line = proc.stderr.readline()
            assert line, "no restart announced"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 143
    finally:
        proc.kill()
        proc.wait()


def test_bad_config_is_not_restarted(tmp_path: Path) -> None:
    """A trainer's own error (2: the config) ends the script with that code, without a restart loop."""
    proc = subprocess.run(
        [str(TORCHRUN_SH), "--config", "configs/debug.yaml", "optim.lr=fast"],
        cwd=ROOT, env=_env(NNODES="1", RDZV_ENDPOINT=f"127.0.0.1:{free_port()}", MAX_RESTARTS="3"),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "config error: optim.lr must be a number" in proc.stderr
    assert "a trainer exited 2: not restarting" in proc.stderr
    assert proc.stderr.count("launch/torchrun.sh: torchrun") == 1


SRUN = """#!/usr/bin/env bash
# srun stand-in: one task per node, all on this machine
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" &
    pids+=($!)
    echo $! >>"$STUB_DIR/tasks"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"""
SCONTROL = """#!/usr/bin/env bash
case "$1" in
show) for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do echo 127.0.0.1; done ;;
requeue) echo "requeue $2" >>"$STUB_DIR/requeued" ;;
esac
"""
SCANCEL = """#!/usr/bin/env bash
# scancel --signal=TERM JOB: signal every task of the job's steps (not the batch shell)
kill -TERM $(cat "$STUB_DIR/tasks")
"""


def _slurm_env(tmp_path: Path, **extra: str) -> tuple[Path, dict[str, str]]:
    """SLURM's commands as stubs in front of PATH, and the variables a 2-node batch job sees."""
    stubs = tmp_path / "slurm-bin"
    stubs.mkdir()
    for name, body in {"srun": SRUN, "scontrol": SCONTROL, "scancel": SCANCEL}.items():
        (stubs / name).write_text(body)
        (stubs / name).chmod(0o755)
    env = _env(
        STUB_DIR=str(stubs), SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="node[0-1]",
        SLURM_SUBMIT_DIR=str(ROOT), RDZV_PORT=str(free_port()), MAX_RESTARTS="0", **extra,
    )  # fmt: skip
    env["PATH"] = f"{stubs}:{env['PATH']}"
    return stubs, env


@pytest.mark.parametrize(("restart_count", "requeued"), [("0", True), ("3", False)])
def test_slurm_batch_requeues_when_a_launcher_gives_up(tmp_path: Path, restart_count: str, requeued: bool):
    """Each node's launcher exits 138 (its rendezvous never forms and MAX_RESTARTS=0): the batch script
    puts the job back in the queue, unless it was requeued MAX_REQUEUES (3) times already."""
    stubs, env = _slurm_env(tmp_path, TORCHRUN="false", SLURM_RESTART_COUNT=restart_count)
    proc = subprocess.run(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), "--config", "configs/debug.yaml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    if requeued:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert (stubs / "requeued").read_text() == "requeue 4242\n"
        assert "gave up restarting (exit 138): requeue 0 of 3" in proc.stdout
    else:
        assert proc.returncode == 138 and not (stubs / "requeued").exists()


@pytest.mark.slow
def test_slurm_batch_checkpoints_and_requeues_on_sigterm(sample_shards: Path, tmp_path: Path) -> None:
    stubs, env = _slurm_env(tmp_path)
    out = tmp_path / "run"
    # long enough to be interrupted: SIGTERM goes in once the first checkpoint (step 1) exists
    args = _train_args(sample_shards, out, "train.max_steps=200", "checkpoint.every_steps=1")
    batch = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *args],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,  # its own process group, so a failed test can stop every task it started
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while checkpoint_step(out) < 1:
            assert batch.poll() is None, batch.communicate()[0][-5000:]
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.5)
        batch.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@120` does
        log = batch.communicate(timeout=120)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(batch.pid, signal.SIGKILL)
    assert batch.returncode == 0, log[-5000:]
    assert "rendezvous 127.0.0.1:" in log and "--nnodes=2 --rdzv-backend=c10d" in log
    assert (stubs / "requeued").read_text() == "requeue 4242\n"
    assert world_size_of(out) == 2
    assert "stopped by SIGTERM" in log
    assert 1 <= checkpoint_step(out) < 200
