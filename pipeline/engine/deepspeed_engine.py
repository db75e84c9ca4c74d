"""Engine `deepspeed`: ZeRO stage 0/1/2 from a JSON file, with our own (client) optimizer.

The loop owns the batch size, accumulation, clipping and precision, so those DeepSpeed keys are written
here from the run config and any values in the JSON file are replaced. Mixed precision is torch autocast
around the forward (fp32 master weights) in both engines, so DeepSpeed's own bf16/fp16 modes stay off and
a method computes the same loss whichever engine runs it. DeepSpeed wraps the module's forward in its own
autocast context, which switches an outer torch autocast *off* unless the config has a `torch_autocast`
section (deepspeed/runtime/torch_autocast.py): so bf16 runs write that section, with no
"lower-precision-safe" modules, so that gradients are still reduced in fp32 as under DDP.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pipeline.engine.checkpoint import MODEL_FILE, CheckpointStore, download, is_local
from pipeline.engine.config import resolve_deepspeed_config
from pipeline.engine.ddp import fp32_state_dict
from pipeline.optim import init_state, keep_fused, skipped_if


def deepspeed_config(
    path: str, *, micro_batch_size: int, grad_accum_steps: int, grad_clip: float | None, bf16: bool = False
) -> dict:
    ds = json.loads(resolve_deepspeed_config(path).read_text())
    ds.update(
        train_micro_batch_size_per_gpu=micro_batch_size,
        gradient_accumulation_steps=grad_accum_steps,
        gradient_clipping=grad_clip or 0.0,
        bf16={"enabled": False},
        fp16={"enabled": False},
        torch_autocast={"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []},
        # ZeRO 1/2 only shard the client optimizer's state; SGD/AdamW work, LARS is refused by the config.
        zero_allow_untested_optimizer=True,
        steps_per_print=ds.get("steps_per_print", 1 << 30),
    )
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accumulation x world
    return ds


def _ensure_process_group(timeout_s: int) -> None:
    """DeepSpeed needs a process group even for one process; torchrun sets one up, `python -m` does not."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(port))
    from datetime import timedelta

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))


class DeepSpeedEngine:
    """Same surface as DDPEngine; DeepSpeed's engine does the gradient reduction and sharded state."""

    def __init__(
        self,
        method: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        *,
        device: torch.device,
        ds_config: dict,
        timeout_s: int,
        compile: bool = False,
    ) -> None:
        import deepspeed

        if device.type == "cpu":
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks on first use (a C++ build);
            # gloo is enough for CPU runs, which are tests and debugging.
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        _ensure_process_group(timeout_s)
        method = method.to(device)
        self.optimizer = make_optimizer(method)  # the schedule writes lr/wd/momentum into its param_groups
        self.ds, _, _, _ = deepspeed.initialize(model=method, optimizer=self.optimizer, config=ds_config)
        init_state(self.optimizer)  # after initialize: ZeRO has swapped in its flat partitions
        self.module: nn.Module = self.ds.module
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if compile:
            self.ds.compile()  # torch.compile of the wrapped module, DeepSpeed's hooks kept outside

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None, *, sync: bool) -> Any:
        self.ds.set_gradient_accumulation_boundary(sync)
        return self.ds(views, labels)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps itself

    def step(self, skip: torch.Tensor) -> torch.Tensor | float:
        """DeepSpeed's step, its client optimizer masked by the device flag `skip` (`skipped_if`)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        # ZeRO >= 1 keeps reduced gradients in its partitions and reports their norm; stage 0 leaves them
        # on the parameters, where we measure them before DeepSpeed clips. Returned unread (no host sync).
        norm = torch.nn.utils.get_total_norm(grads) if self.stage == 0 and grads else None
        with skipped_if(self.optimizer, skip):
            self.ds.step()
        if norm is None:
            reported = self.ds.get_global_grad_norm()
            norm = reported if reported is not None else float("nan")
        return norm

    def save(self, store: CheckpointStore, step: int, state: dict[str, Any] | None) -> None:
        """Every rank writes its DeepSpeed shards; rank 0 (`state` not None) adds model.pt and state.pt."""
        staging = Path(store.staging_dir(step))
        staging.parent.mkdir(parents=True, exist_ok=True)
        self.ds.save_checkpoint(str(staging.parent), tag=staging.name, save_latest=False)
        if not store.local and state is None:
            store.upload(str(staging), step)
        dist.barrier()
        if state is not None:
            torch.save(fp32_state_dict(self.module.state_dict()), staging / MODEL_FILE)
            store.commit(step, str(staging), state)
        dist.barrier()
        if not store.local:
            shutil.rmtree(staging.parent, ignore_errors=True)  # this rank's local staging copy

    def load(self, step_dir: str, state: dict[str, Any]) -> None:
        local = Path(download(step_dir))
        path, _ = self.ds.load_checkpoint(
            str(local.parent), tag=local.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if not is_local(step_dir):
            shutil.rmtree(local.parent, ignore_errors=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {step_dir}")
        keep_fused(self.optimizer)
