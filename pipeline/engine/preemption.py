"""How a run stops and what its exit code tells the launcher.

SIGTERM/SIGINT (preemption, Kubernetes, SLURM, Ctrl-C) ask the loop to checkpoint and exit 0. A rank that
stops because *another* rank was signalled, or because a peer died under a collective, exits
`EXIT_RESTART` instead: its node is healthy but the job is incomplete, so the launcher (launch/torchrun.sh)
starts a fresh rendezvous and the run resumes from its newest checkpoint.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import FrameType
from typing import Any

# 128 + SIGUSR1: the Kubeflow training operator's user-defined retryable code (restartPolicy: ExitCode);
# the Indexed Job's podFailurePolicy and launch/slurm.sbatch treat it as retryable too
EXIT_RESTART = 138
PEER_SIGNAL = "a peer's signal"  # `stopped_by` when another rank got the signal
EXIT_STATUS_DIR = "EXIT_STATUS_DIR"  # set by launch/torchrun.sh: each trainer writes rank-N there


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


def lost_a_peer(error: BaseException) -> bool:
    """A collective failed because another rank died, left or stopped answering (NCCL and the store raise
    `DistError`s; gloo a RuntimeError from its TCP transport), not because of this rank's own work."""
    import torch.distributed as dist  # here: `pipeline.train` loads its config before torch

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    return isinstance(error, dist.DistError) or "gloo/transport" in str(error)


def resume_reason(state: dict[str, Any]) -> str:
    """Why the run is resuming, for rank 0's log line: what stopped it (saved with the checkpoint) and
    what the launcher says about the restart (RESTART_REASON, set by launch/torchrun.sh)."""
    stopped_by = state.get("stopped_by")
    why = f"stopped by {stopped_by}" if stopped_by else "the run before ended without a stop checkpoint"
    launcher = os.environ.get("RESTART_REASON")
    return f"{why}; {launcher}" if launcher else why


def write_exit_status(code: int) -> None:
    """Tell launch/torchrun.sh this trainer's exit code (torchrun itself reports 1 for any failure)."""
    folder = os.environ.get(EXIT_STATUS_DIR)
    if folder and Path(folder).is_dir():  # gone when this trainer outlived its launcher
        Path(folder, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
