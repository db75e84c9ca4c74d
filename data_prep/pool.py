"""Worker processes for `shard` and `index`: spawned (never forked), bounded in flight, ended with the run."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


class WorkerDied(Exception):
    """A worker process died mid-run; finished work is kept and a re-run resumes."""


class _AbandonedTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


def quiet_abandoned_tasks() -> None:
    """A store lost mid-request leaves aiohttp tasks behind; asyncio logs each one (a dozen lines of
    traceback) when it is collected, burying the one line that says what happened."""
    logging.getLogger("asyncio").addFilter(_AbandonedTasks())


def _worker_init(parent_pid: int) -> None:
    """Pool initializer: a worker must not outlive the run, even when the parent is SIGKILLed
    (Linux: PR_SET_PDEATHSIG; elsewhere the parent's own shutdown still ends its workers)."""
    quiet_abandoned_tasks()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _stop_workers() -> None:
    """Interrupted: end the pool's workers now instead of letting them finish their tasks."""
    for process in multiprocessing.active_children():
        process.terminate()
    for process in multiprocessing.active_children():
        process.join(timeout=10)


def run_parallel(
    fn: Callable[[T], R], tasks: Iterable[T], workers: int, on_done: Callable[[T, R], None]
) -> None:
    """`on_done(task, fn(task))` for every task, in completion order. Tasks are drawn from the iterable
    only as workers free up (at most 2 per worker in flight), so a plan of millions of items is never
    held in memory as tasks."""
    tasks = iter(tasks)
    if workers == 1:
        for task in tasks:
            on_done(task, fn(task))
        return
    # spawn, not fork: the parent may hold s3fs event-loop threads that a forked child would inherit
    ctx = multiprocessing.get_context("spawn")
    pool_args = {"mp_context": ctx, "initializer": _worker_init, "initargs": (os.getpid(),)}
    with cf.ProcessPoolExecutor(max_workers=workers, **pool_args) as pool:
        in_flight: dict[cf.Future, T] = {}

        def refill(pending: Iterator[T]) -> None:
            for task in pending:
                in_flight[pool.submit(fn, task)] = task
                if len(in_flight) >= 2 * workers:
                    return

        try:
            refill(tasks)
            while in_flight:
                done, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
                for future in done:
                    on_done(in_flight.pop(future), future.result())
                refill(tasks)
        except cf.process.BrokenProcessPool as e:
            raise WorkerDied(str(e)) from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_workers()
            raise
