"""Checkpoints on a local path or an fsspec URL, written so that a crash never leaves a half checkpoint.

Layout under the checkpoint root (default `{run.output_dir}/checkpoints`):

    step-00000123/state.pt   torch.save dict: model (unwrapped fp32 state_dict; absent for DeepSpeed),
                             optimizer, loader, rng (one entry per rank), step, epoch, config, wandb_run_id
    step-00000123/model.pt   DeepSpeed runs only, beside DeepSpeed's own sharded files
    latest                   text: the newest step folder's name

A step folder is complete when its `state.pt` exists: `state.pt` is always written last. Locally the folder
is assembled under a temporary name and renamed; object stores have no rename, so there the data objects
go first, then `state.pt`, then the `latest` pointer.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fsspec
import torch

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"^step-(\d{8})$")


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


class CheckpointStore:
    """The checkpoint root: listing, atomic saving, pruning to the last K, and finding what to resume."""

    def __init__(self, root: str, keep_last: int = 3) -> None:
        self.root = root.rstrip("/")
        self.keep_last = keep_last
        self.fs, self._path = fsspec.core.url_to_fs(self.root)
        self.local = is_local(self.root)

    def complete_steps(self) -> list[int]:
        """Steps with a complete checkpoint, oldest first."""
        self.fs.invalidate_cache(self._path)  # object-store listings are cached; other ranks/runs write
        try:
            entries = self.fs.ls(self._path, detail=False)
        except FileNotFoundError:
            return []
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

    def staging_dir(self, step: int) -> str:
        """Local folder to assemble step `step` in before `commit` (same base name on every rank)."""
        if self.local:
            return str(Path(self._path) / f".tmp-{step_name(step)}")
        return str(Path(tempfile.gettempdir()) / f"ckpt-{os.getpid()}" / step_name(step))

    def commit(self, step: int, staging: str, state: dict[str, Any] | None) -> str:
        """Make the staged folder the checkpoint for `step` (writing `state` last) and prune old ones."""
        final = _join(self.root, step_name(step))
        if self.local:
            if state is not None:
                _save_local(state, Path(staging) / STATE_FILE)
            final_path = Path(self._path) / step_name(step)
            if final_path.exists():
                shutil.rmtree(final_path)
            os.replace(staging, final_path)
        else:
            self.upload(staging, step)
            if state is not None:
                with self.fs.open(_join(self._path, step_name(step), STATE_FILE), "wb") as f:
                    f.write(_to_bytes(state))
            shutil.rmtree(staging, ignore_errors=True)
        self._write_latest(step_name(step))
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
        staging.mkdir(parents=True)
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


def _save_local(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def read_object(url: str) -> Any:
    """torch.load a file we wrote ourselves (dicts with numpy RNG states: not weights_only)."""
    with fsspec.open(url, "rb") as f:
        return torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=False)


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
    raise FileNotFoundError(f"no complete checkpoint (a step-XXXXXXXX folder with {STATE_FILE}) under {path}")


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

    step_dir = find_step_dir(str(path))
    state = read_object(_join(step_dir, STATE_FILE))
    model = state.get("model")
    if model is None:
        model = read_object(_join(step_dir, MODEL_FILE))
    return from_dict(state["config"]), model
