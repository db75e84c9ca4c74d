"""Health checks: skip steps whose loss is not finite, and stop cleanly after too many in a row.

The skip itself is decided on the device (pipeline.engine.trainer); the guard counts skipped steps there
too, so a steady-state step reads nothing on the host. The loop reads the counts at its check steps
(`read`, one small copy with the step's flags) and `check` raises if a streak reached `max_bad_steps`
since the last read: a streak is caught at the first check step at or after its last bad step.
"""

from __future__ import annotations

import torch


class TrainingDiverged(RuntimeError):
    """Raised after `max_bad_steps` non-finite losses in a row; the last good checkpoint (if any) is kept."""


class BadStepGuard:
    """Counts skipped (non-finite) steps on the device; the flag it is given is all-reduced, so every rank
    holds the same counts and takes the same decision."""

    def __init__(self, max_bad_steps: int, device: torch.device) -> None:
        self.max_bad_steps = max_bad_steps
        # skipped since the last read, skipped in a row now, longest run in a row since the last read
        self.counts = torch.zeros(3, dtype=torch.float64, device=device)
        self.in_a_row = 0  # as of the last read
        self.longest = 0

    def record(self, skipped: torch.Tensor) -> None:
        """One step's device flag (bool scalar); device ops only."""
        bad = skipped.to(torch.float64)
        since, row, longest = self.counts.unbind()
        since.add_(bad)
        row.add_(1.0).mul_(bad)
        torch.maximum(longest, row, out=longest)

    def take(self, counts: list[float]) -> int:
        """The host's copy of `counts` (read with the step's flags): returns the steps skipped since the
        last read, and starts the next interval from the current streak."""
        skipped, self.in_a_row, self.longest = (int(c) for c in counts)
        self.counts[0].zero_()
        self.counts[2].copy_(self.counts[1])
        return skipped

    def check(self, step: int, last_checkpoint: str | None) -> None:
        """Raise once `max_bad_steps` steps in a row were skipped, naming the checkpoint that is kept."""
        if self.longest >= self.max_bad_steps:
            kept = (
                f"the last good checkpoint, {last_checkpoint}, is intact"
                if last_checkpoint
                else "no checkpoint was written before it"
            )
            raise TrainingDiverged(
                f"loss was NaN/Inf for {self.longest} steps in a row (up to step {step}); stopping; {kept}: "
                "lower optim.lr, set train.grad_clip, or check the data"
            )
