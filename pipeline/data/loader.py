"""One entry point for training data: `build_loader(cfg, ...)` builds the backend `cfg.backend` names.

`BACKENDS` lists them; each entry imports its module only when chosen (the CPU path never imports
DALI). Every backend is a `contract.TrainLoader`, constructed as
`Backend(cfg, split=, rank=, world_size=, seed=, device=, memory_format=)`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pipeline.data.config import DataConfig
from pipeline.data.contract import TrainLoader


def _cpu() -> type[TrainLoader]:
    from pipeline.data.cpu import CpuLoader

    return CpuLoader


def _dali() -> type[TrainLoader]:
    from pipeline.data.dali import DaliLoader

    return DaliLoader


def _torch() -> type[TrainLoader]:
    from pipeline.data.torch_loader import TorchLoader

    return TorchLoader


BACKENDS: dict[str, Callable[[], type[TrainLoader]]] = {"cpu": _cpu, "dali": _dali, "torch": _torch}


def build_loader(
    cfg: DataConfig,
    *,
    split: str = "train",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> TrainLoader:
    """The training loader of `cfg.backend` for global `rank`, yielding views on `device` in
    `memory_format` (decided by `contract.memory_format`)."""
    if memory_format not in (torch.contiguous_format, torch.channels_last):
        raise ValueError(
            f"memory_format must be torch.contiguous_format or torch.channels_last, got {memory_format}"
        )
    backend = BACKENDS[cfg.backend]()
    return backend(
        cfg,
        split=split,
        rank=rank,
        world_size=world_size,
        seed=seed,
        device=torch.device(device),
        memory_format=memory_format,
    )
