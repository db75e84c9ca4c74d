"""One training per run folder and per checkpoint location, held by rank 0 for the run's lifetime.

The run folder: an exclusive POSIX lock on RUN/.lock. The kernel drops it when its holder dies, so a run
killed with SIGKILL never blocks the next one; the lock file itself stays and only says who held it
last. A POSIX (`lockf`) lock, not a `flock`: it belongs to the process, so forked DataLoader workers that
outlive a failed run do not keep holding it.

The checkpoint location (`checkpoint.dir`, local or an object store, where no lock exists): a lease
object `.lease` beside the step folders naming its holder (the run folder) and an expiry, renewed by a
heartbeat and verified before each checkpoint is written. Two runs with different run folders and one
`checkpoint.dir` would otherwise overwrite each other's step folders. A lease whose holder died is
stale: at its expiry, or at once on the holder's own host when its process is gone. The same run folder
resuming takes its own lease back whatever its expiry. A run that ends deletes its lease.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import fsspec

from pipeline.engine.checkpoint import CheckpointError, is_local, oserror_line

LOCK_FILE = ".lock"
LEASE_FILE = ".lease"
LEASE_TTL_S = 600.0  # how long a holder that died blocks another run on another host
RENEW_EVERY_S = 60.0
RELEASE_WAIT_S = 5.0


class RunFolderBusy(RuntimeError):
    """Another live training holds the run folder or the checkpoint location (exit 2)."""


class LeaseLost(CheckpointError):
    """Another run took the checkpoint location over (this one was paused past its lease): exit 2."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunFolderBusy naming the holder; OSError (its filename the folder or the
        lock file) if it cannot be taken."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(self.path)) from None  # a directory, a dangling link
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunFolderBusy(
                f"run.output_dir {self.path.parent} is in use by another training ({holder}); wait for it "
                "to finish or stop it, or choose another run.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _parse(data: bytes) -> dict[str, Any] | None:
    """A lease's JSON; anything else (an empty or foreign file) counts as none and is overwritten."""
    try:
        lease = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return lease if isinstance(lease, dict) else None


class CheckpointLease:
    """Rank 0's claim on a checkpoint root (a local path or fsspec URL) for the run in `holder`."""

    def __init__(self, root: str, holder: str, ttl_s: float = LEASE_TTL_S) -> None:
        self.root = root.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(self.root)
        self.path = f"{path.rstrip('/')}/{LEASE_FILE}"
        self.holder, self.ttl_s = holder, ttl_s
        self.me = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid()}
        self._mutex = threading.Lock()  # the heartbeat and a checkpoint's verify never interleave
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made: str | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease as stored, or None; an unreadable one counts as none (it is rewritten)."""
        self.fs.invalidate_cache()
        try:
            return _parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def stale(self, lease: dict[str, Any]) -> bool:
        """Expired, or held by a process of this host that is gone."""
        if time.time() > float(lease.get("expires", 0)):
            return True
        return lease.get("host") == socket.gethostname() and not _alive(int(lease.get("pid", 0)))

    def acquire(self, settle_s: float = 0.5) -> CheckpointLease:
        """Take the lease or raise RunFolderBusy naming its holder; OSError/store errors if unwritable.

        Locally the check and the write happen under a POSIX lock on the lease file. Object stores have
        no lock for everyone: write, wait `settle_s`, read back; of two runs starting together the one
        whose write landed last keeps it, and the other finds it taken."""
        local = is_local(self.root)
        folder = self.path.rsplit("/", 1)[0]
        if local and not self.fs.exists(folder):  # object stores have no folders
            self.fs.makedirs(folder)
            self._made = folder  # removed again if the run leaves it empty (a refusal before any step)
        if local:  # through one descriptor: closing any other would drop this process's lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX)  # held for one read and one write: milliseconds
                self._check(_parse(os.pread(fd, 1 << 16, 0)))
                os.ftruncate(fd, 0)
                os.pwrite(fd, self._payload(), 0)
            finally:
                os.close(fd)
        else:
            self._check(self.read())
            self._write()
            time.sleep(settle_s)
            current = self.read()
            if current is None or not self._mine(current):
                raise self._busy(current or {})
        self._thread = threading.Thread(target=self._heartbeat, name="checkpoint-lease", daemon=True)
        self._thread.start()
        return self

    def verify(self) -> None:
        """Before a checkpoint is written: still ours (renewed), or LeaseLost naming who took it."""
        with self._mutex:
            current = self.read()
            if current is None or not self._mine(current):
                raise LeaseLost(
                    f"checkpoint.dir {self.root} was taken over by another training "
                    f"({self._describe(current or {})}) while this one held it; this run stops without "
                    "writing there: give one of the runs another checkpoint.dir"
                )
            self._write()

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours. Best effort: the run is ending, maybe
        because the store is unreachable, and a lease left behind only expires."""
        self._stop.set()
        if self._thread is None:
            return
        self._thread.join(timeout=RELEASE_WAIT_S)  # a renewal stuck on a lost store
        self._thread = None
        try:
            with self._mutex:
                current = self.read()
                if current is not None and self._mine(current):
                    self.fs.rm_file(self.path)
            if self._made is not None and not os.listdir(self._made):
                os.rmdir(self._made)
        except Exception as e:  # OSError locally; botocore / aiohttp errors from object stores
            print(
                f"warning: could not remove the lease {self.root}/{LEASE_FILE} ({oserror_line(e)}); it "
                f"expires in {self.ttl_s:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def _mine(self, lease: dict[str, Any]) -> bool:
        return all(lease.get(k) == v for k, v in self.me.items())

    def _check(self, current: dict[str, Any] | None) -> None:
        if current is not None and current.get("holder") != self.holder and not self.stale(current):
            raise self._busy(current)

    def _payload(self) -> bytes:
        return json.dumps({**self.me, "expires": time.time() + self.ttl_s}).encode()

    def _write(self) -> None:
        self.fs.pipe_file(self.path, self._payload())

    def _heartbeat(self) -> None:
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                self.verify()
            except Exception:  # a lost store or a lost lease: the next checkpoint's verify says which
                continue

    def _describe(self, lease: dict[str, Any]) -> str:
        host, pid = lease.get("host", "?"), lease.get("pid", "?")
        return f"run.output_dir {lease.get('holder', '?')}, pid {pid} on host {host}"

    def _busy(self, lease: dict[str, Any]) -> RunFolderBusy:
        left = max(0, int(float(lease.get("expires", 0)) - time.time()))
        return RunFolderBusy(
            f"checkpoint.dir {self.root} is in use by another training ({self._describe(lease)}; its lease "
            f"{self.path.rsplit('/', 1)[-1]} expires in {left} s unless renewed); choose another "
            "checkpoint.dir, or wait for that run to end"
        )
