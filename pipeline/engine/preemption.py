"""SIGTERM/SIGINT (preemption, Kubernetes, SLURM, Ctrl-C) ask the loop to checkpoint and exit 0."""

from __future__ import annotations

import signal
from types import FrameType


class StopRequest:
    """Set by a signal; the loop all-reduces it each step, so every rank stops after the same step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> StopRequest:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
