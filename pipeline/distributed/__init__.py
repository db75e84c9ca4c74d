"""The one place for cross-rank work: process-group setup, gathers with gradients, shuffled BN.

Every function here also works without a process group (a world of one), so losses and methods that
call them need no `if distributed` branches of their own.
"""

from pipeline.distributed.env import (
    DistEnv,
    exit_rank,
    init_from_env,
    is_distributed,
    leave_process_group,
    rank,
    world_size,
)
from pipeline.distributed.gather import (
    all_gather_no_grad,
    all_reduce_mean,
    all_reduce_sum,
    gather_with_grad,
    with_global_value,
)
from pipeline.distributed.shuffle import shuffle_batch, unshuffle_batch

__all__ = [
    "DistEnv",
    "all_gather_no_grad",
    "all_reduce_mean",
    "all_reduce_sum",
    "exit_rank",
    "gather_with_grad",
    "init_from_env",
    "is_distributed",
    "leave_process_group",
    "rank",
    "shuffle_batch",
    "unshuffle_batch",
    "with_global_value",
    "world_size",
]
