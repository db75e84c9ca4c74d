"""Process-group setup from torchrun's environment, and who-am-I queries that work without one."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int  # global rank: use it for anything that must be unique across the job
    local_rank: int  # rank within the node: use it only to pick the device
    world_size: int
    device: torch.device


def init_from_env(timeout_s: float = 600) -> DistEnv:
    """Join the process group torchrun (or SLURM/K8s via torchrun) describes in RANK/WORLD_SIZE/LOCAL_RANK.

    NCCL on CUDA, gloo on the CPU. Without those variables it is a world of one and no group is created.
    `timeout_s` bounds every collective, so a dead rank surfaces as an error instead of a hang.
    Calling it again once a group exists returns the existing world.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return DistEnv(rank=0, local_rank=0, world_size=1, device=device)

    global_rank = int(os.environ["RANK"])
    size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", global_rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(
            backend, rank=global_rank, world_size=size, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    return DistEnv(
        rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(), device=device
    )


def leave_process_group(*, completed: bool) -> None:
    """Tear the process group down so that no rank's exit can crash a peer that exits later.

    DDP (torch 2.14) keeps the gloo group's threads and sockets alive past `destroy_process_group`, until
    interpreter teardown; a peer exiting first then kills the late rank with SIGABRT ("terminate called
    without an active exception"): 3 exits in 36 with two CPU ranks, 0 in 72 with the abort below.
    Once every rank is past a barrier no collective is in flight, so closing the connections is safe.
    After a failure (`completed=False`) peers may never reach a barrier: the group is only destroyed.
    """
    if not dist.is_initialized():
        return
    if completed and dist.get_world_size() > 1:
        dist.barrier()
        if dist.get_backend() == "gloo":
            dist.group.WORLD.abort()
    dist.destroy_process_group()


def exit_rank(code: int) -> NoReturn:
    """End a process that was one rank of a group, after its work is written, without interpreter teardown.

    The group DDP keeps alive (see `leave_process_group`) is otherwise torn down during interpreter exit,
    which still aborted a rank now and then after the closing abort (once in three CI runs of the 2-rank
    tests). Output is flushed first; atexit handlers do not run, so callers close what they opened.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def is_distributed() -> bool:
    """True when a process group with more than one rank is up (a group of one behaves like none)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
