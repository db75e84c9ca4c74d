"""Checkpoints on a local path or an fsspec URL, written so that a crash never leaves a half checkpoint.

Layout under the checkpoint root (default `{run.output_dir}/checkpoints`):

    step-00000123/state.pt   torch.save dict: model (unwrapped fp32 state_dict; absent for DeepSpeed),
                             optimizer, loader, rng (one entry per rank), step, epoch, config, wandb_run_id
    step-00000123/state.sha256  sha256 of state.pt, written just before it: a truncated or damaged
                             state.pt is told apart from a good one, and the newest intact step is used
    step-00000123/model.pt   DeepSpeed runs only, beside DeepSpeed's own sharded files
    latest                   text: the newest step folder's name

A step folder is complete when its `state.pt` exists: `state.pt` is always written last. Locally the folder
is assembled under a temporary name and renamed; object stores have no rename, so there the data objects
go first, then `state.pt`, then the `latest` pointer. `latest` is for people: readers list the step folders.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch

STATE_FILE = "state.pt"
CHECKSUM_FILE = "state.sha256"
MODEL_FILE = "model.pt"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read (no space, read-only, damaged, missing): one line naming
    the path and the way out; the commands exit 2."""


def oserror_line(e: Exception) -> str:
    name = errno.errorcode.get(e.errno, "") if getattr(e, "errno", None) else ""
    return f"{name}: {e.strerror}" if name and e.strerror else f"{type(e).__name__}: {e}".splitlines()[0]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class CheckpointStore:
    """The checkpoint root: listing, atomic saving, pruning to the last K, and finding what to resume."""

    def __init__(self, root: str, keep_last: int = 3) -> None:
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self.local = is_local(self.root)
        # called before each commit: the run's lease on this root (pipeline.engine.runlock), on rank 0
        self.before_commit: Callable[[], None] | None = None

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.fs.invalidate_cache(self._path)  # object-store listings are cached; other ranks/runs write
        try:
            entries = self.fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
        except Exception as e:  # an unreachable object store, bad credentials
            if self.local and not isinstance(e, OSError):
                raise
            raise CheckpointError(
                f"cannot list checkpoints in {self.root} ({oserror_line(e)}); check the store and its "
                "credentials, or set checkpoint.dir elsewhere"
            ) from None
        steps = []
        for entry in entries:
            match = _STEP_RE.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if match and self.fs.exists(f"{entry.rstrip('/')}/{STATE_FILE}"):
                steps.append(int(match.group(1)))
        return sorted(steps)

    def newest(self) -> str | None:
        """URL/path of the newest complete step folder, or None."""
        steps = self.complete_steps()
        return _join(self.root, step_name(steps[-1])) if steps else None

    def newest_intact(self, warn: Callable[[str], None] = _warn) -> tuple[str, dict[str, Any]] | None:
        """(step folder, its state) of the newest checkpoint whose state.pt reads back intact; each damaged
        newer one is named in a warning. None without any checkpoint; CheckpointError if none is intact."""
        damaged = []
        for step in reversed(self.complete_steps()):
            step_dir = _join(self.root, step_name(step))
            try:
                state = read_state(step_dir)
            except CheckpointError as e:
                damaged.append(str(e))
                continue
            for message in damaged:
                warn(f"{message}; using {step_name(step)} instead")
            return step_dir, state
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint under {self.root} ({len(damaged)} damaged, newest: {damaged[0]}); "
                "start over with checkpoint.resume=none or a new run.output_dir"
            )
        return None

    def check_writable(self, need_bytes: int = 0) -> None:
        """Before the first step: prove the root takes a file (write and delete a probe) and, locally, has
        room for one checkpoint of `need_bytes`. Raises CheckpointError naming the root."""
        probe = _join(self._path, f".write-probe-{uuid.uuid4().hex[:8]}")
        try:
            if self.local:  # object stores have no folders (and makedirs would create a missing bucket)
                self.fs.makedirs(self._path, exist_ok=True)
            self.fs.pipe_file(probe, b"probe")
            self.fs.rm_file(probe)
        except Exception as e:  # OSError locally; botocore / aiohttp errors from object stores
            line = oserror_line(e)
            raise CheckpointError(
                f"checkpoint.dir {self.root} is not writable ({line}); fix its permissions or credentials, "
                "or set checkpoint.dir to a writable location"
            ) from None
        if self.local and need_bytes:
            free = shutil.disk_usage(self._path).free
            if free < need_bytes:
                raise CheckpointError(
                    f"checkpoint.dir {self.root} has {free / 2**20:.1f} MiB free, one checkpoint needs about "
                    f"{need_bytes / 2**20:.1f} MiB; free space or set checkpoint.dir elsewhere"
                )

    def staging_dir(self, step: int) -> str:
        """Local folder to assemble step `step` in before `commit` (same base name on every rank)."""
        if self.local:
            return str(Path(self._path) / f".tmp-{step_name(step)}")
        return str(Path(tempfile.gettempdir()) / f"ckpt-{os.getpid()}" / step_name(step))

    def commit(self, step: int, staging: str, state: dict[str, Any] | None) -> str:
        """Make the staged folder the checkpoint for `step` (writing `state` last) and prune old ones."""
        final = _join(self.root, step_name(step))
        if self.before_commit is not None:
            try:
                self.before_commit()
            except Exception as e:  # the lease taken over (CheckpointError), or the store unreachable
                shutil.rmtree(staging, ignore_errors=True)
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(
                    f"cannot renew this run's lease on {self.root} before writing {final} "
                    f"({oserror_line(e)}); check the store, then resume (checkpoint.resume=auto)"
                ) from None
        try:
            data = _to_bytes(state) if state is not None else None
            if self.local:
                if data is not None:
                    (Path(staging) / CHECKSUM_FILE).write_text(hashlib.sha256(data).hexdigest() + "\n")
                    (Path(staging) / STATE_FILE).write_bytes(data)
                final_path = Path(self._path) / step_name(step)
                if final_path.exists():
                    shutil.rmtree(final_path)
                os.replace(staging, final_path)
            else:
                self.upload(staging, step)
                if data is not None:
                    remote = _join(self._path, step_name(step))
                    self.fs.pipe_file(_join(remote, CHECKSUM_FILE), hashlib.sha256(data).hexdigest().encode())
                    self.fs.pipe_file(_join(remote, STATE_FILE), data)
                shutil.rmtree(staging, ignore_errors=True)
            self._write_latest(step_name(step))
        except Exception as e:  # ENOSPC, EROFS, EACCES; a lost object store (botocore, aiohttp errors)
            if self.local and not isinstance(e, OSError):
                raise
            shutil.rmtree(staging, ignore_errors=True)
            raise CheckpointError(
                f"cannot write checkpoint {final}: {oserror_line(e)}; free space or point checkpoint.dir "
                "elsewhere, then resume (checkpoint.resume=auto)"
            ) from None
        self.prune()
        return final

    def upload(self, staging: str, step: int) -> None:
        """Object stores: copy this rank's staged files (everything but state.pt) into the step folder."""
        remote = _join(self._path, step_name(step))
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file() and path.name != STATE_FILE:
                self.fs.put_file(str(path), _join(remote, path.relative_to(staging).as_posix()))

    def save(self, step: int, state: dict[str, Any], extra: Callable[[Path], None] | None = None) -> str:
        """Single-writer save: `extra(folder)` may add files (e.g. model.pt) before state.pt lands."""
        staging = Path(self.staging_dir(step))
        shutil.rmtree(staging, ignore_errors=True)
        try:
            staging.mkdir(parents=True)
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint under {self.root}: {oserror_line(e)}") from None
        if extra is not None:
            extra(staging)
        return self.commit(step, str(staging), state)

    def _write_latest(self, name: str) -> None:
        if self.local:
            tmp = Path(self._path) / f".{LATEST_FILE}.tmp"
            tmp.write_text(name + "\n")
            os.replace(tmp, Path(self._path) / LATEST_FILE)
        else:
            with self.fs.open(_join(self._path, LATEST_FILE), "w") as f:
                f.write(name + "\n")

    def prune(self) -> None:
        """Keep the newest `keep_last` complete checkpoints; drop older ones and stale temporaries."""
        steps = self.complete_steps()
        for step in steps[: -self.keep_last]:
            self.fs.rm(_join(self._path, step_name(step)), recursive=True)
        if self.local:
            newest = steps[-1] if steps else -1
            for tmp in Path(self._path).glob(".tmp-step-*"):
                if int(tmp.name.rsplit("-", 1)[-1]) <= newest:
                    shutil.rmtree(tmp, ignore_errors=True)


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def read_object(url: str) -> Any:
    """torch.load a file we wrote ourselves (dicts with numpy RNG states: not weights_only)."""
    with fsspec.open(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


def read_state(step_dir: str) -> dict[str, Any]:
    """state.pt of `step_dir`, checked against its state.sha256 (checkpoints written before checksums
    existed are only unpickled); a truncated or damaged file raises CheckpointError naming the step."""
    fs, fpath = fsspec.core.url_to_fs(step_dir)
    name = step_dir.rstrip("/").rsplit("/", 1)[-1]
    try:
        data = fs.cat_file(f"{fpath}/{STATE_FILE}")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {step_dir} has no {STATE_FILE}") from None
    try:
        expected = fs.cat_file(f"{fpath}/{CHECKSUM_FILE}").decode().strip()
    except FileNotFoundError:
        expected = None
    if expected is not None and hashlib.sha256(data).hexdigest() != expected:
        raise CheckpointError(f"checkpoint {name} is damaged ({STATE_FILE} does not match its sha256)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip (miniz), unpickling errors
        reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
        raise CheckpointError(f"checkpoint {name} is damaged ({STATE_FILE}: {reason})") from None


def find_step_dir(path: str) -> str:
    """A run dir, checkpoints dir, step dir or state.pt (local or URL) -> the step folder to load."""
    path = path.rstrip("/")
    fs, fpath = fsspec.core.url_to_fs(path)
    if path.endswith(STATE_FILE) or path.endswith(MODEL_FILE):
        return path.rsplit("/", 1)[0]
    if fs.exists(f"{fpath}/{STATE_FILE}"):
        return path
    for root in (path, _join(path, "checkpoints")):
        newest = CheckpointStore(root).newest()
        if newest is not None:
            return newest
    raise CheckpointError(
        f"no checkpoint (a step-XXXXXXXX folder with {STATE_FILE}) under {path}; name a run folder, its "
        "checkpoints folder or a step folder"
    )


def download(step_dir: str) -> str:
    """Local copy of a step folder (DeepSpeed loads only from the local filesystem)."""
    if is_local(step_dir):
        return fsspec.core.url_to_fs(step_dir)[1]
    local = tempfile.mkdtemp(prefix="ckpt-")
    fs, fpath = fsspec.core.url_to_fs(step_dir)
    target = os.path.join(local, step_dir.rsplit("/", 1)[-1])
    fs.get(fpath + "/", target, recursive=True)
    return target


def load_for_eval(path: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """(Config, method state_dict) from a run dir, checkpoints dir, step dir or state.pt, local or URL."""
    from pipeline.config import from_dict

    step_dir, state = find_state(str(path))
    model = state.get("model")
    if model is None:
        try:
            model = read_object(_join(step_dir, MODEL_FILE))
        except Exception as e:
            reason = f"{type(e).__name__}: {e}".splitlines()[0][:120]
            raise CheckpointError(f"checkpoint {step_dir}: {MODEL_FILE} is unreadable ({reason})") from None
    return from_dict(state["config"]), model


def find_state(path: str, warn: Callable[[str], None] = _warn) -> tuple[str, dict[str, Any]]:
    """(step folder, state) for a run dir, checkpoints dir, step dir or state.pt. A folder of checkpoints
    falls back to its newest intact step (with a warning per damaged one); a named step must be intact."""
    path = path.rstrip("/")
    fs, fpath = fsspec.core.url_to_fs(path)
    if path.endswith(STATE_FILE) or path.endswith(MODEL_FILE) or fs.exists(f"{fpath}/{STATE_FILE}"):
        step_dir = find_step_dir(path)
        return step_dir, read_state(step_dir)
    for root in (path, _join(path, "checkpoints")):
        found = CheckpointStore(root).newest_intact(warn)
        if found is not None:
            return found
    return find_step_dir(path), {}  # raises: nothing there
