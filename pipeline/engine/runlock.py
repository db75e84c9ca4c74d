"""One training per run folder: rank 0 holds an exclusive POSIX lock on RUN/.lock for the run's lifetime.

The kernel drops the lock when its holder dies, so a run killed with SIGKILL never blocks the next one;
the lock file itself stays and only says who held it last. A POSIX (`lockf`) lock, not a `flock`: it
belongs to the process, so forked DataLoader workers that outlive a failed run do not keep holding it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live training holds the run folder (exit 2)."""


class RunLock:
    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunFolderBusy naming the holder; OSError if the folder is unwritable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                os.close(fd)
                raise
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
