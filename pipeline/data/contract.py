"""What every training loader promises, whichever backend reads the shards (`loader.BACKENDS`).

A leaf: the trainer, the benchmarks and each backend import these types from here, never from the
factory that picks a backend, so no backend depends on another.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


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
      batches (cpu, torch: bit-identical; dali: its reader and random-op checkpoint, restored at the
      same rank and layout). At another batch size or world size it neither repeats nor skips more
      than one batch per rank.
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
    epoch the next `for` starts epoch + 1 unless `set_epoch` named one."""

    def __init__(self, batches_per_epoch: int) -> None:
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.batches_consumed = 0
        self._advance_on_iter = False

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:  # the same epoch keeps its position: resume calls set_epoch(saved epoch)
            self.epoch, self.batches_consumed = epoch, 0
        self._advance_on_iter = False

    def start_iter(self) -> None:
        if self._advance_on_iter:
            self.epoch, self.batches_consumed = self.epoch + 1, 0
        self._advance_on_iter = False

    def consumed_one(self) -> None:
        self.batches_consumed += 1
        if self.batches_consumed >= self.batches_per_epoch:
            self._advance_on_iter = True

    def state_dict(self, batch_size: int, world_size: int) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            # counted in global samples so a resume at another world size neither repeats nor skips
            # more than one batch per rank
            "samples_consumed": self.batches_consumed * batch_size * world_size,
            "batch_size": batch_size,
            "world_size": world_size,
        }

    def load_state_dict(self, state: dict[str, Any], batch_size: int, world_size: int) -> None:
        self.epoch = int(state["epoch"])
        if state.get("batch_size") == batch_size and state.get("world_size") == world_size:
            self.batches_consumed = int(state["batches_consumed"])
        else:
            per_step = batch_size * world_size
            self.batches_consumed = -(-int(state["samples_consumed"]) // per_step)  # ceil: never repeat
        self.batches_consumed = min(self.batches_consumed, self.batches_per_epoch)
        self._advance_on_iter = False
