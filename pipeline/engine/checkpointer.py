"""When a checkpoint is written, decided in one place (torchtitan's `checkpointer.save(step, ...)`).

A save is due every `checkpoint.every_steps`, at each epoch end, after a stop signal and at the run's
last step (a `train.max_steps` mid-epoch). It is skipped when this step is saved already, and during a
streak of non-finite steps: the store keeps only the last `keep_last` checkpoints, and a diverging state
must not push the good ones out.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.engine.checkpoint import CheckpointStore, find_state, step_name

if TYPE_CHECKING:
    from pipeline.config import Config


def checkpoint_root(cfg: Config) -> str:
    return cfg.checkpoint.dir or str(Path(cfg.run.output_dir) / "checkpoints")


def find_resume(cfg: Config, store: CheckpointStore, warn: bool) -> tuple[str, dict[str, Any]] | None:
    """(step folder, state) to resume from: the newest intact under the root (`auto`; damaged newer ones
    are named in a warning), an explicit path, or None."""

    def say(message: str) -> None:
        if warn:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    if cfg.checkpoint.resume == "none":
        return None
    if cfg.checkpoint.resume == "auto":
        return store.newest_intact(say)
    return find_state(cfg.checkpoint.resume, say)


class Checkpointer:
    """Decides whether a step's checkpoint is due and writes it through `write(step)` (the engine's save
    of the model, optimizer and train state; collective: every rank calls `save` at the same steps)."""

    def __init__(
        self,
        store: CheckpointStore,
        every_steps: int | None,
        write: Callable[[int], None],
        resumed_from: tuple[int, str] | None = None,
    ) -> None:
        self.store = store
        self.every_steps = every_steps
        self.write = write
        self.saved_step, self.last = resumed_from or (None, None)  # `last`: newest checkpoint of the run

    def due(
        self, step: int, *, epoch_end: bool = False, stopping: bool = False, last_step: bool = False
    ) -> bool:
        every = bool(self.every_steps) and step % self.every_steps == 0
        return step != self.saved_step and (every or epoch_end or stopping or last_step)

    def save(
        self,
        step: int,
        *,
        bad_streak: bool,
        epoch_end: bool = False,
        stopping: bool = False,
        last_step: bool = False,
    ) -> bool:
        """Write step `step`'s checkpoint if it is due and the last step was good; True when written."""
        if bad_streak or not self.due(step, epoch_end=epoch_end, stopping=stopping, last_step=last_step):
            return False
        self.write(step)
        self.saved_step, self.last = step, f"{self.store.root}/{step_name(step)}"
        return True
