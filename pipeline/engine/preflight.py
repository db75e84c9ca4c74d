"""Checks before the first step, taken by every rank together: one rank's refusal stops all of them at
once instead of leaving the others waiting in a collective until the timeout."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import nn

from pipeline.engine.checkpoint import CheckpointError, CheckpointStore, oserror_line
from pipeline.engine.runlock import LOCK_FILE, CheckpointLease, RunFolderBusy, RunLock
from pipeline.schema import ConfigError

# One checkpoint holds the weights (and buffers) plus up to two optimizer moments per weight (AdamW).
CHECKPOINT_SIZE_FACTOR = 3


def agree(error: Exception | None, world_size: int) -> None:
    """Raise the first rank's error on every rank (errors pickle: every rank raises the same one)."""
    errors = [error]
    if world_size > 1:
        errors = [None] * world_size
        dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first


def lock_run_folder(run_dir: str, is_main: bool, world_size: int) -> RunLock:
    """Rank 0 takes RUN/.lock (creating RUN); an unwritable or busy run folder refuses the run."""
    lock, error = RunLock(run_dir), None
    if is_main:
        try:
            lock.acquire()
        except RunFolderBusy as e:
            error = e
        except OSError as e:
            reason = e.strerror or str(e)
            if e.filename is not None and Path(e.filename).name == LOCK_FILE:
                error = ConfigError(
                    f"run.output_dir {run_dir}: its lock file {e.filename} cannot be opened or locked "
                    f"({reason}); remove or repair it (rm -r, chattr -i), or choose another run.output_dir"
                )
            else:
                reason = f"run.output_dir {run_dir} is not writable ({reason})"
                error = ConfigError(f"{reason}; choose a writable one")
    agree(error, world_size)
    return lock


def lease_checkpoint_dir(
    store: CheckpointStore, run_dir: str, is_main: bool, world_size: int
) -> CheckpointLease | None:
    """Rank 0 takes the checkpoint root's lease for this run folder and verifies it before each commit;
    a root leased by another live run (or unwritable) refuses the run before anything is written there."""
    lease, error = None, None
    if is_main:
        lease = CheckpointLease(store.root, str(Path(run_dir).resolve()))
        try:
            lease.acquire()
            store.before_commit = lease.verify
        except RunFolderBusy as e:
            error = e
        except Exception as e:  # OSError locally; botocore / aiohttp errors from object stores
            error = CheckpointError(
                f"checkpoint.dir {store.root} is not writable ({oserror_line(e)}); fix its permissions or "
                "credentials, or set checkpoint.dir to a writable location"
            )
    agree(error, world_size)
    return lease


def checkpoint_bytes(module: nn.Module) -> int:
    """Rough size of one checkpoint of `module` with its optimizer state."""
    state = module.state_dict()
    return CHECKPOINT_SIZE_FACTOR * sum(t.numel() * t.element_size() for t in state.values())


def check_checkpoint_dir(store: CheckpointStore, module: nn.Module, world_size: int) -> None:
    """The checkpoint root takes a file and, locally, has room for one checkpoint: found now, not at
    the first save hours into the run."""
    error = None
    try:
        store.check_writable(checkpoint_bytes(module))
    except CheckpointError as e:
        error = e
    agree(error, world_size)


def write_run_config(run_dir: str, config: dict[str, Any], step: int) -> None:
    """RUN/config.yaml is the config in force; a resumed run with changes keeps the one it replaces as
    RUN/config.until-step-XXXXXXXX.yaml."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if path.exists() and path.read_text() != text and step > 0:
        path.replace(path.with_name(f"config.until-step-{step:08d}.yaml"))
    tmp = path.with_name(".config.yaml.tmp")
    tmp.write_text(text)
    tmp.replace(path)
