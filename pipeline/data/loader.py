"""One entry point for training data: `build_loader(cfg, ...)` picks the DALI, torch or CPU backend.

Every backend yields `Batch(views, labels)` with views as [V x (B, 3, H_v, W_v)] on `device`, have
`len()` = batches per epoch per rank (equal on every rank), and keep a position (epoch, batches
consumed) that `state_dict()` exposes and `load_state_dict()` restores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from pipeline.data.config import DataConfig

if TYPE_CHECKING:
    from pipeline.data.cpu import CpuLoader
    from pipeline.data.dali import DaliLoader
    from pipeline.data.torch_loader import TorchLoader


@dataclass
class Batch:
    views: list[torch.Tensor]  # V x (B, 3, H_v, W_v); globals first, then locals
    labels: torch.Tensor | None  # (B,) int64, None for unlabelled shards


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


def build_loader(
    cfg: DataConfig,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> CpuLoader | DaliLoader | TorchLoader:
    """The training loader of `cfg.backend` for this rank: `CpuLoader`, `DaliLoader` or `TorchLoader`."""
    device = torch.device(device)
    if cfg.backend == "dali":
        from pipeline.data.dali import DaliLoader

        return DaliLoader(cfg, split=split, rank=rank, world_size=world_size, seed=seed, device=device)
    if cfg.backend == "torch":
        from pipeline.data.torch_loader import TorchLoader

        return TorchLoader(cfg, split=split, rank=rank, world_size=world_size, seed=seed, device=device)
    from pipeline.data.cpu import CpuLoader

    return CpuLoader(cfg, split=split, rank=rank, world_size=world_size, seed=seed, device=device)
