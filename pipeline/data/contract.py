"""What every training loader promises, whichever backend reads the shards (`loader.BACKENDS`).

A leaf: the trainer, the benchmarks and each backend import these types from here, never from the
factory that picks a backend, so no backend depends on another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from pipeline.data.sampling import Stage


@dataclass
class Batch:
    views: list[torch.Tensor]  # V x (B, 3, H_v, W_v); globals first, then locals
    labels: torch.Tensor | None  # (B,) int64, None for unlabelled shards


@runtime_checkable
class TrainLoader(Protocol):
    """A training loader of one rank, as the trainer uses it.

    - Sharding by global rank: rank r of `world_size` reads its own part of the samples, disjoint from
      the other ranks' parts (local rank only picks the device).
    - `len(loader)`: batches per epoch of this rank, the same on every rank (an epoch's remainder is
      dropped), so no rank waits for another at the epoch end.
    - Iterating yields `Batch`es: views V x (B, 3, H_v, W_v) on the loader's device, in the memory format
      `build_loader` was given, float32 or float16 (`data.dtype`); labels (B,) int64, or None when the
      shards have none. It continues the current epoch; after a finished epoch the next `for` starts
      the next one.
    - `set_epoch(e)`: the next `for` reads epoch e (from its start, unless e is the current epoch).
    - `state_dict()`: a picklable position (epoch, batches consumed, and the same in global samples);
      `load_state_dict` of it makes a new loader continue where the saved one stopped, with the same
      batches (cpu, torch: bit-identical; dali: the same samples, and its random-op checkpoint restored
      at the same rank and layout). At another batch size or world size it finishes the epoch with the
      samples no rank had reached, repeating none (`sampling`).
    """

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[Batch]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The one place that decides the layout of images and convolution weights: channels_last only on
    CUDA, where it speeds up convolutions (on the CPU it is slower)."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format


class Position:
    """Epoch and batches consumed in it. Iterating continues the current epoch; after a finished
    epoch the next `for` starts epoch + 1 unless `set_epoch` named one.

    `stages`: the layouts (world size, batch size) the current epoch was read under before this one,
    each with where it began and stopped; `first_batch`: the batch (in this layout's units) at which
    the current layout took over. Both are empty/0 unless a resume changed the layout mid-epoch (see
    `sampling`)."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batches_consumed = 0
        self.stages: list[Stage] = []
        self.first_batch = 0
        self._advance_on_iter = False

    def _new_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_consumed, self.stages, self.first_batch = epoch, 0, [], 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the same epoch keeps its position: resume calls set_epoch(saved epoch)
            self._new_epoch(epoch)
        self._advance_on_iter = False

    def start_iter(self) -> None:
        if self._advance_on_iter:
            self._new_epoch(self.epoch + 1)
        self._advance_on_iter = False

    def consumed_one(self) -> None:
        self.batches_consumed += 1
        if self.batches_consumed >= self.batches_per_epoch:
            self._advance_on_iter = True

    def samples_consumed(self, batch_size: int, world_size: int) -> int:
        """Global samples read in this epoch, over every stage."""
        earlier = sum((s.batches_consumed - s.first_batch) * s.batch_size * s.world_size for s in self.stages)
        return earlier + (self.batches_consumed - self.first_batch) * batch_size * world_size

    def state_dict(self, batch_size: int, world_size: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            # counted in global samples so a resume at another layout continues the epoch's schedule
            "samples_consumed": self.samples_consumed(batch_size, world_size),
            "batch_size": batch_size,
            "world_size": world_size,
            "first_batch": self.first_batch,
            "stages": [dataclasses.asdict(s) for s in self.stages],
        }

    def load_state_dict(self, state: dict[str, Any], batch_size: int, world_size: int) -> None:
        self.epoch = int(state["epoch"])
        self.stages = [Stage(**s) for s in state.get("stages", [])]
        self.first_batch = int(state.get("first_batch", 0))
        if state.get("batch_size") == batch_size and state.get("world_size") == world_size:
            self.batches_consumed = int(state["batches_consumed"])
        else:  # a new stage: the samples no rank reached, split under this layout
            consumed = int(state["batches_consumed"])
            if consumed > self.first_batch:
                self.stages.append(
                    Stage(state["world_size"], state["batch_size"], self.first_batch, consumed)
                )
            per_step = batch_size * world_size
            self.batches_consumed = -(-int(state["samples_consumed"]) // per_step)  # ceil: never repeat
            self.first_batch = self.batches_consumed
        self.batches_consumed = min(self.batches_consumed, self.batches_per_epoch)
        self._advance_on_iter = False
