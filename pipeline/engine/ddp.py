"""Engine `ddp`: DistributedDataParallel (optional SyncBN) around the method, plain torch optimizer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.engine.checkpoint import CheckpointStore
from pipeline.optim import init_state, keep_fused, skipped_if
from pipeline.schema import ConfigError


class DDPEngine:
    """Wraps the method for data parallelism; `module` stays the plain method for eval and checkpoints."""

    def __init__(
        self,
        method: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        *,
        device: torch.device,
        grad_accum_steps: int,
        grad_clip: float | None,
        sync_bn: bool,
        compile: bool,
    ) -> None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if sync_bn and distributed:
            if device.type != "cuda":  # torch's SyncBatchNorm refuses CPU tensors at the first forward
                raise ConfigError("train.sync_bn needs CUDA devices; set train.sync_bn=false on the CPU")
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        self.module = method.to(device)
        self.optimizer = make_optimizer(self.module)
        init_state(self.optimizer)
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.distributed = distributed
        wrapped: nn.Module = self.module
        if distributed:
            # Buffers are not broadcast: the queue is filled from gathered keys and is already identical
            # on every rank, and re-sending BN statistics and a 65k-key queue every step costs bandwidth.
            wrapped = DistributedDataParallel(
                self.module,
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        self.ddp = wrapped
        self.wrapped = torch.compile(wrapped) if compile else wrapped

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None, *, sync: bool) -> Any:
        """The method's (loss, logs); `sync=False` defers the gradient all-reduce (accumulation)."""
        no_sync = self.ddp.no_sync() if self.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            return self.wrapped(views, labels)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum_steps).backward()

    def step(self, skip: torch.Tensor) -> torch.Tensor:
        """Clip, step, zero; where the device flag `skip` is set the optimizer leaves weights and state
        bit-identical. Returns the global grad norm before clipping (identical on every rank), as a
        device tensor: reading it is a host sync, left to the logging steps."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)
        with skipped_if(self.optimizer, skip):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any] | None) -> None:
        """Rank 0 writes model + optimizer + `state` (None on other ranks); all ranks wait for it."""
        if state is not None:
            full = {
                **state,
                "model": fp32_state_dict(self.module.state_dict()),
                "optimizer": self.optimizer.state_dict(),
            }
            store.save(step, full)
        if self.distributed:
            dist.barrier()

    def load(self, step_dir: str, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        keep_fused(self.optimizer)


def fp32_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU fp32 copies: a checkpoint loads anywhere, whatever dtype or device it was trained in."""
    return {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
        for k, v in state.items()
    }
