"""Where a run is, saved in every checkpoint and restored from it in one place: the progress (step,
epoch, batches consumed, W&B run id, bad steps), every rank's RNG streams and every rank's loader
position. The model and optimizer are the engine's to save (`Engine.save` / `Engine.load`)."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pipeline.data.contract import TrainLoader


def new_run_id() -> str:
    """W&B-compatible run id; kept in checkpoints so a resumed run continues the same W&B run."""
    return uuid.uuid4().hex[:12]


@dataclass
class Progress:
    """How far the run is."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches consumed in `epoch`, per rank
    wandb_run_id: str = field(default_factory=new_run_id)
    bad_steps: int = 0  # steps skipped for a non-finite loss, over the whole run

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Progress:
        """Fields this version knows; a checkpoint from an older or newer version still resumes."""
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})

    def advance(self, batches: int) -> None:
        """One optimizer step over `batches` loader batches. Skipped (non-finite) steps are added to
        `bad_steps` when the loop reads the device's counts (pipeline.engine.health)."""
        self.step += 1
        self.batches_in_epoch += batches


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


class TrainState:
    """The run's progress with this rank's RNG streams and loader position.

    `capture` gathers every rank's part into the dict a checkpoint stores; `restore` takes this rank's
    part back. A restored loader position is applied when its epoch starts (`epoch_batches`)."""

    def __init__(self, loader: TrainLoader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size
        self.progress = Progress()
        self.loader_position: dict[str, Any] | None = None  # saved mid-epoch: where the epoch continues
        self.stopped_by: str | None = None  # the signal that stopped the run, saved with its checkpoint

    def capture(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """Collective (every rank calls it): the checkpoint's state dict on rank 0, None elsewhere."""
        rngs = _all_gather_objects(rng_state(), self.world_size)
        loaders = _all_gather_objects(self.loader.state_dict(), self.world_size)
        if self.rank != 0:
            return None
        return {
            "progress": asdict(self.progress),
            "step": self.progress.step,
            "epoch": self.progress.epoch,
            "loader": loaders,
            "rng": rngs,
            "config": config,
            "wandb_run_id": self.progress.wandb_run_id,
            "stopped_by": self.stopped_by,
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Progress, this rank's RNG streams and loader position from a checkpoint's state dict. A run
        resumed on more ranks than saved it takes rank % saved ranks (DALI reader state is per rank)."""
        self.progress = Progress.from_saved(saved["progress"])
        set_rng_state(saved["rng"][self.rank % len(saved["rng"])])
        self.loader_position = saved["loader"][self.rank % len(saved["loader"])]

    def next_epoch(self) -> None:
        """The next epoch starts at its first batch."""
        self.progress.epoch += 1
        self.progress.batches_in_epoch = 0
        self.loader_position = None

    def epoch_batches(self) -> Iterator[Any]:
        """The current epoch's batches: after a mid-epoch resume, the rest of that epoch."""
        if self.loader_position is not None:
            self.loader.load_state_dict(self.loader_position)
            self.loader_position = None
        else:
            self.loader.set_epoch(self.progress.epoch)
        return iter(self.loader)
