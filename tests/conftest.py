"""Shared fixtures: the embedded CIFAR-10 sample, its shards, and a real S3 server on loopback."""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Small models on a shared CPU: a second intra-op thread costs more than it gains (when the cores are busy,
# OpenMP threads spin waiting for each other). Set before torch is imported so spawned ranks and
# subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).parent))  # tests/s3.py is importable as `s3` from every test file

from data_prep.__main__ import main as data_prep_main

if TYPE_CHECKING:
    from s3 import S3Server

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "sample_data" / "cifar10_mini"
# After the session, how long the interpreter's own exit (atexit handlers, joins of threads and children,
# destructors) may take before the exit watchdog reports what holds it and ends the process.
EXIT_GRACE_S = 120


def shard_folder(src: Path, out: Path, samples_per_shard: int = 250) -> Path:
    """Shard `src` into `out` through the real CLI entry point (in-process, one worker)."""
    argv = ["shard", str(src), str(out), "--labels", "auto", "--samples-per-shard", str(samples_per_shard)]
    code = data_prep_main([*argv, "--workers", "1", "--seed", "0"])
    if code != 0:
        raise RuntimeError(f"data_prep shard {src} {out} exited with {code}")
    return out


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """`sample_data/cifar10_mini`: train/ (2,000) and val/ (500) class folders of 32x32 JPEGs."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar10_mini/train sharded with labels: 8 shards of 250, `.idx` files and manifest.json."""
    return shard_folder(SAMPLE_DIR / "train", tmp_path_factory.mktemp("sample_shards"))


@pytest.fixture(scope="session")
def sample_val_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cifar10_mini/val sharded with labels: 2 shards of 250."""
    return shard_folder(SAMPLE_DIR / "val", tmp_path_factory.mktemp("sample_val_shards"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1; its env (credentials + endpoint) is exported to this process for
    the rest of the session, and `server.env` is what to pass to subprocesses."""
    import s3  # here, not at the top: GPU machines running `python -m bench gpu` have no moto

    server = s3.start_s3_server()
    try:
        with s3.environment(server):
            yield server
    finally:
        server.stop()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Arm the exit watchdog. Every result is reported by now, but something left running (a thread the
    interpreter joins at exit, a child it waits for, a destructor that blocks) can hold the process, and CI
    then waits out its whole time limit on a session whose tests passed, with nothing to say what held it.
    The watchdog prints every thread's stack and the live children, then ends the process with the
    session's own status; the C-level dump a little later covers a hang where no Python thread can run
    any more (late in interpreter teardown), and exits 1. Armed only when pytest is the program (not
    `pytest.main` inside a notebook or an IDE, which must outlive the session)."""
    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    if not (main_spec and main_spec.name.startswith("pytest")) and Path(sys.argv[0]).name != "pytest":
        return
    status = int(exitstatus)
    threading.Thread(target=_end_held_exit, args=(status,), name="exit-watchdog", daemon=True).start()
    faulthandler.dump_traceback_later(EXIT_GRACE_S + 30, exit=True, file=sys.__stderr__)


def _end_held_exit(status: int) -> None:
    time.sleep(EXIT_GRACE_S)
    err = sys.__stderr__
    print(f"\nconftest: pytest still running {EXIT_GRACE_S} s after the session; what holds it:", file=err)
    print(f"live children: {multiprocessing.active_children()}", file=err, flush=True)
    faulthandler.dump_traceback(file=err, all_threads=True)
    print(f"conftest: ending the process with the session's status {status}", file=err, flush=True)
    os._exit(status)
