"""Real gloo process groups for the tests: `world` CPU ranks on this machine, each running the same checks.

The ranks fork from a server process that imported torch and the pipeline once (multiprocessing's
forkserver), so a group costs a fork per rank rather than a fresh interpreter importing torch in each,
which dominated the distributed tests' time. The server itself only imports, so no thread or lock of
pytest's is carried into a rank (the danger of forking pytest directly).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp

from ports import free_port

# What every rank needs before its first check; torch._dynamo is what DDP's first construction imports.
PRELOAD = ["torch", "torch._dynamo", "pipeline.distributed", "pipeline.methods"]


def run_ranks(checks: Callable[..., None], world: int, *args: Any) -> None:
    """`checks(rank, world, *args)` in each rank of a `world`-rank gloo group; a failing check raises in
    its rank and is re-raised here with the traceback. `checks` and `args` must pickle (a module-level
    function and plain data)."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # takes effect when the first group starts the server
    mp.start_processes(
        _rank,
        args=(world, free_port(), dict(os.environ), checks, args),
        nprocs=world,
        join=True,
        start_method="forkserver",
    )


def _rank(
    r: int, world: int, port: int, environ: dict[str, str], checks: Callable[..., None], args: tuple
) -> None:
    from pipeline import distributed as pd

    os.environ.clear()  # the test's environment now, not the server's from when it started
    os.environ.update(environ)
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # gloo on the CPU on a GPU machine too
    torch.set_num_threads(1)
    pd.init_from_env(timeout_s=60)
    completed = False
    try:
        checks(r, world, *args)
        completed = True
    finally:
        pd.leave_process_group(completed=completed)
    pd.exit_rank(0)  # every check passed
