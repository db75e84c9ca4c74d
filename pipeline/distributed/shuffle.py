"""Shuffled BatchNorm for MoCo's key encoder (He et al., 2020, sec. 3.3): shuffle the global batch
across ranks before the key encoder and undo it after, so BN statistics cannot leak which key is the
query's positive.

The permutation is drawn on rank 0 and broadcast, so every rank agrees without a shared seed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.distributed.env import is_distributed, rank
from pipeline.distributed.gather import all_gather_no_grad


@torch.no_grad()
def shuffle_batch(
    x: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ...) -> (this rank's B rows of the globally permuted batch, index to undo it).

    Without a process group the batch is permuted locally (BN then sees the same statistics, which
    is harmless). Returns `(x_shuffled, unshuffle_index)` for `unshuffle_batch`. No gradient: it is
    for the momentum encoder's input.
    """
    b = x.shape[0]
    x_all = all_gather_no_grad(x)  # (W * B, ...)
    perm = torch.randperm(x_all.shape[0], generator=generator, device="cpu").to(x.device)
    if is_distributed():
        dist.broadcast(perm, src=0)
    unshuffle = torch.argsort(perm)
    r = rank()
    return x_all[perm[r * b : (r + 1) * b]], unshuffle


@torch.no_grad()
def unshuffle_batch(x: torch.Tensor, unshuffle_index: torch.Tensor) -> torch.Tensor:
    """Inverse of `shuffle_batch`: (B, ...) in shuffled order -> (B, ...) rows for this rank's own samples."""
    b = x.shape[0]
    x_all = all_gather_no_grad(x)  # (W * B, ...) in shuffled global order
    r = rank()
    return x_all[unshuffle_index[r * b : (r + 1) * b]]
