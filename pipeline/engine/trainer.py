"""The training loop: `train(cfg)` builds a `Trainer` from small build_* functions and runs its `fit`,
which reads top to bottom: the state saves and restores itself (pipeline.engine.state), the checkpointer
decides when to save (pipeline.engine.checkpointer), the logger lays out the rows (pipeline.engine.logger).

One optimizer step = `train.grad_accum_steps` loader batches per rank. The loss and its non-finite flag
stay on the device across the micro-batches; before the update one small all-reduce of (loss sum,
non-finite count, stop flag) gives every rank the same device flags: a NaN/Inf step is skipped by the
optimizer on the device (GradScaler's `found_inf`, pipeline.optim.build) and the method's after-step hook
is undone there too, so ranks never diverge and the CPU never waits for the GPU in a steady-state step.
The host reads the flags only at check steps (`Trainer.check_due`: logging steps, every
`CHECK_EVERY_STEPS` steps, checkpoint steps, epoch ends and the last step), in one small copy with the
bad-step counts: a stop signal or a diverged run is acted on there, at the same step on every rank.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Config, check_launch, to_dict
from pipeline.data.contract import TrainLoader, memory_format
from pipeline.engine.checkpoint import CheckpointStore
from pipeline.engine.checkpointer import Checkpointer, checkpoint_root, find_resume
from pipeline.engine.health import BadStepGuard
from pipeline.engine.logger import RunLogger, StepLog, Throughput
from pipeline.engine.preemption import PEER_SIGNAL, StopRequest
from pipeline.engine.preflight import (
    check_checkpoint_dir,
    lease_checkpoint_dir,
    lock_run_folder,
    write_run_config,
)
from pipeline.engine.resume import check_not_past_end, config_changes, resume_point, resumed_line
from pipeline.engine.state import TrainState

if TYPE_CHECKING:
    from pipeline.distributed import DistEnv
    from pipeline.optim import Schedule


class Engine(Protocol):
    """What the loop needs from `ddp` and `deepspeed`; the method never sees which one runs it."""

    module: nn.Module  # the plain method (eval, checkpoints, its hooks)
    optimizer: torch.optim.Optimizer  # the client optimizer; the schedule writes into its param_groups

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None, *, sync: bool) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self, skip: torch.Tensor) -> torch.Tensor | float: ...
    def save(self, store: CheckpointStore, step: int, state: dict[str, Any] | None) -> None: ...
    def load(self, step_dir: str, state: dict[str, Any]) -> None: ...


@dataclass
class TrainResult:
    step: int
    epoch: int
    stopped_by: str | None  # signal name when preempted
    last_checkpoint: str | None


# ---------------------------------------------------------------------------------------------- builders


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")


def build_precision(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast around the forward (fp32 master weights) under DDP. DeepSpeed enters the same
    autocast itself, inside its forward, from the `torch_autocast` section that `deepspeed_config` writes;
    an outer one would be switched off there on CUDA (deepspeed/runtime/torch_autocast.py), so there is
    none: both devices take the same path."""
    if uses_bf16(cfg, device) and cfg.train.engine != "deepspeed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_engine(
    cfg: Config,
    method: nn.Module,
    device: torch.device,
    global_batch_size: int,
    fmt: torch.memory_format,
) -> Engine:
    """The method wrapped by `train.engine`, its weights in `fmt` (pipeline.data.contract.memory_format)."""
    from pipeline.optim import build_optimizer

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg.optim, module, global_batch_size)

    method = method.to(memory_format=fmt)
    compile = cfg.train.compile and device.type == "cuda"
    if cfg.train.engine == "deepspeed":
        from pipeline.engine.deepspeed_engine import DeepSpeedEngine, deepspeed_config

        ds_config = deepspeed_config(
            cfg.train.deepspeed_config,
            micro_batch_size=cfg.data.batch_size,
            grad_accum_steps=cfg.train.grad_accum_steps,
            grad_clip=cfg.train.grad_clip,
            bf16=uses_bf16(cfg, device),
        )
        return DeepSpeedEngine(
            method,
            make_optimizer,
            device=device,
            ds_config=ds_config,
            timeout_s=cfg.train.collective_timeout_s,
            compile=compile,
        )
    from pipeline.engine.ddp import DDPEngine

    return DDPEngine(
        method,
        make_optimizer,
        device=device,
        grad_accum_steps=cfg.train.grad_accum_steps,
        grad_clip=cfg.train.grad_clip,
        sync_bn=cfg.train.sync_bn,
        compile=compile,
    )


def seed_everything(seed: int, deterministic: bool) -> None:
    """With `deterministic`, every op that has a deterministic kernel uses it; the few that have none on
    CUDA (e.g. the backward of adaptive average pooling to sizes above 1x1) warn once and run anyway, so
    a CUDA run is reproducible only up to those ops. CPU runs are bit-exact (what exact resume tests)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


@dataclass(frozen=True)
class StepBudget:
    """Optimizer steps per epoch, over the schedule, and the step this run ends at."""

    batches_per_epoch: int  # loader batches per epoch per rank
    grad_accum_steps: int
    global_batch_size: int  # samples per optimizer step over all ranks
    epochs: int
    max_steps: int | None  # stop early; the schedule still spans `epochs`
    step_offset: int = 0  # steps taken minus the schedule's position: non-zero after a global-batch change

    @property
    def steps_per_epoch(self) -> int:
        return self.batches_per_epoch // self.grad_accum_steps

    @property
    def total_steps(self) -> int:
        """The schedule's length."""
        return self.steps_per_epoch * self.epochs

    @property
    def last_step(self) -> int:
        end = self.total_steps + self.step_offset
        return min(end, self.max_steps or end)

    @property
    def epoch_batches(self) -> int:
        """Batches per rank that an epoch's whole steps consume (a remainder short of a step is left)."""
        return self.steps_per_epoch * self.grad_accum_steps

    def epoch_done(self, batches_in_epoch: int) -> bool:
        return batches_in_epoch + self.grad_accum_steps > self.epoch_batches


def build_budget(cfg: Config, batches_per_epoch: int, world_size: int) -> StepBudget:
    accum = cfg.train.grad_accum_steps
    if batches_per_epoch < accum:
        raise ValueError(
            f"an epoch has {batches_per_epoch} batches per rank, fewer than train.grad_accum_steps={accum}"
        )
    global_batch_size = cfg.data.batch_size * world_size * accum
    return StepBudget(batches_per_epoch, accum, global_batch_size, cfg.train.epochs, cfg.train.max_steps)


# ---------------------------------------------------------------------------------------------- one step


CHECK_EVERY_STEPS = 10  # the host reads the step flags at least this often: a SIGTERM is obeyed within it


def _global_flags(loss_sum: torch.Tensor, n_bad: torch.Tensor, stop: bool, world_size: int) -> torch.Tensor:
    """(loss sum over ranks, non-finite count over ranks, ranks asked to stop), one all-reduce, unread.

    `loss_sum` and `n_bad` are device scalars (finite losses summed, non-finite ones counted); the stop
    flag joins them on the device with a fill, not a pageable host-to-device copy."""
    flags = torch.stack([loss_sum, n_bad, torch.full_like(loss_sum, float(stop))])
    if world_size > 1:
        backend_device = flags.device if dist.get_backend() == "nccl" else torch.device("cpu")
        on_backend = flags.to(backend_device)
        dist.all_reduce(on_backend)
        flags = on_backend.to(loss_sum.device)
    return flags


@dataclass(frozen=True)
class StepContext:
    """What every step needs and no step changes."""

    device: torch.device
    precision: contextlib.AbstractContextManager
    memory_format: torch.memory_format  # of the views, the same as the model's weights
    grad_accum_steps: int
    world_size: int
    total_steps: int


@dataclass
class DeviceStep:
    """One step's outcome, still on the device; `read` (a host sync) turns it into the logged `StepLog`."""

    flags: torch.Tensor  # (3,) float64: global mean loss (NaN when skipped), 1 if applied, 1 if stopping
    skipped: torch.Tensor  # bool scalar: some rank saw a NaN/Inf loss, every rank skipped the update
    grad_norm: torch.Tensor | float
    data_wait_s: float
    logs: dict[str, Any]

    def read(self, values: list[float] | None = None) -> StepLog:
        """`values`: `flags` already copied to the host (with other counts, in one read); else read now."""
        loss, applied, stop = self.flags.tolist() if values is None else values
        return StepLog(loss, applied > 0, stop > 0, self.grad_norm, self.data_wait_s, self.logs)


def _follows_the_step(module: nn.Module) -> list[torch.Tensor]:
    """What the method's `after_optimizer_step` may write (its parameters and buffers): restored on the
    device after a skipped step. Empty when the method keeps the base class's hook, which writes nothing."""
    from pipeline.methods.base import Method

    if type(module).after_optimizer_step is Method.after_optimizer_step:
        return []
    return [*module.parameters(), *module.buffers()]


def _after_step(module: nn.Module, skipped: torch.Tensor, step: int, total_steps: int) -> dict[str, Any]:
    """The method's after-step hook (EMA targets, normalised prototypes), undone where `skipped`: every
    tensor it may write is snapshotted and put back with a lerp of weight 0 or 1, exact for the finite
    values a masked step leaves (integer buffers by `torch.where`)."""
    tensors = _follows_the_step(module)
    saved = [t.detach().clone() for t in tensors]
    logs = module.after_optimizer_step(step, total_steps)
    if tensors:
        floats = [i for i, t in enumerate(tensors) if t.is_floating_point()]
        with torch.no_grad():
            if floats:
                weight = skipped.to(tensors[floats[0]].dtype)
                torch._foreach_lerp_([tensors[i] for i in floats], [saved[i] for i in floats], weight)
            for t, old in zip(tensors, saved, strict=True):
                if not t.is_floating_point():
                    torch.where(skipped, old, t, out=t.data)
    return logs


def train_step(
    engine: Engine, batches: Iterator[Any], ctx: StepContext, step: int, stop_requested: bool
) -> DeviceStep:
    """One optimizer step over `grad_accum_steps` micro-batches; the update is skipped on any NaN/Inf.

    Every micro-batch runs its backward (a NaN only poisons gradients that are then dropped), so all
    ranks enter the same gradient reductions; the skip is a device flag, the same on every rank."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    n_bad = torch.zeros((), dtype=torch.float64, device=ctx.device)
    logs: dict[str, Any] = {}
    wait = 0.0
    for micro in range(ctx.grad_accum_steps):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        views = [v.to(ctx.device, non_blocking=True) for v in batch.views]  # V x (B, 3, H, W)
        views = [v.contiguous(memory_format=ctx.memory_format) for v in views]
        labels = batch.labels.to(ctx.device, non_blocking=True) if batch.labels is not None else None
        with ctx.precision:
            loss, method_logs = engine.forward(views, labels, sync=micro == ctx.grad_accum_steps - 1)
        value = loss.detach().double()
        finite = torch.isfinite(value)
        loss_sum += torch.where(finite, value, 0.0)
        n_bad += (~finite).double()
        engine.backward(loss)
        logs.update(method_logs)
    total, bad, stops = _global_flags(loss_sum, n_bad, stop_requested, ctx.world_size).unbind()
    skipped = bad > 0
    engine.module.after_backward(step, ctx.total_steps)  # the method's gradient edits, before clipping
    grad_norm = engine.step(skipped)
    logs.update(_after_step(engine.module, skipped, step, ctx.total_steps))  # e.g. EMA targets follow
    mean_loss = torch.where(skipped, math.nan, total / (ctx.world_size * ctx.grad_accum_steps))
    flags = torch.stack([mean_loss, (~skipped).double(), (stops > 0).double()])
    return DeviceStep(flags, skipped, grad_norm, wait, logs)


def meter_add(meter: Throughput, t0: float, data_wait_s: float) -> float:
    """Add the time since `t0` to `meter`; returns now, the next step's `t0`. Summed between two reads
    the times are the wall time of the steps in between, whatever the device ran ahead or behind."""
    now = time.perf_counter()
    meter.add(now - t0, data_wait_s)
    return now


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, announce: Callable[[Trainer], None] | None = None) -> TrainResult:
    """Run (or resume) the whole training described by `cfg`; returns when done or preempted. Rank 0
    holds the run folder's lock throughout: a second training into the same run.output_dir is refused.
    `announce` is called on rank 0 with the built trainer before its first step (the CLI's banner)."""
    from pipeline.distributed import init_from_env

    env = init_from_env(cfg.train.collective_timeout_s)
    check_launch(cfg, env.world_size, env.device.type)  # what needs the world size and device
    lock = lock_run_folder(cfg.run.output_dir, env.rank == 0, env.world_size)
    lease = None
    try:
        store = CheckpointStore(checkpoint_root(cfg), keep_last=cfg.checkpoint.keep_last)
        lease = lease_checkpoint_dir(store, cfg.run.output_dir, env.rank == 0, env.world_size)
        found = find_resume(cfg, store, warn=env.rank == 0)
        if found is not None:  # a fixed key changed (the engine, the model): refused before building
            config_changes(found[1]["config"], cfg, found[0])
        trainer = Trainer.build(cfg, env)
        if announce is not None and env.rank == 0:
            announce(trainer)
        return trainer.fit(store, found)
    finally:
        if lease is not None:
            lease.release()
        lock.release()


class Trainer:
    """The pieces of one run, built from its config (`build`); `fit` runs them."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        loader: TrainLoader,
        budget: StepBudget,
        engine: Engine,
        schedule: Schedule,
        ctx: StepContext,
    ) -> None:
        self.cfg, self.env, self.loader, self.budget = cfg, env, loader, budget
        self.engine, self.schedule, self.ctx = engine, schedule, ctx
        self.is_main = env.rank == 0

    @classmethod
    def build(cls, cfg: Config, env: DistEnv) -> Trainer:
        """Seeds, then the loader, the step budget it implies, the engine around the method, the schedule."""
        from pipeline.data import build_loader
        from pipeline.methods import build_method
        from pipeline.optim import build_schedule

        device, world_size = env.device, env.world_size
        seed_everything(cfg.run.seed, cfg.run.deterministic)
        fmt = memory_format(cfg.train.channels_last, device)
        loader = build_loader(
            cfg.data,
            split="train",
            rank=env.rank,
            world_size=world_size,
            seed=cfg.run.seed,
            device=device,
            memory_format=fmt,
        )
        budget = build_budget(cfg, len(loader), world_size)
        engine = build_engine(cfg, build_method(cfg), device, budget.global_batch_size, fmt)
        schedule = build_schedule(
            cfg.optim, budget.total_steps, budget.steps_per_epoch, budget.global_batch_size
        )
        precision = build_precision(cfg, device)
        ctx = StepContext(device, precision, fmt, budget.grad_accum_steps, world_size, budget.total_steps)
        return cls(cfg, env, loader, budget, engine, schedule, ctx)

    def fit(self, store: CheckpointStore, found: tuple[str, dict[str, Any]] | None) -> TrainResult:
        """Resume from `found` (`find_resume`'s), then optimizer steps until the last one or a stop signal:
        each step logged and offered to the checkpointer, each finished epoch closed by `end_epoch`."""
        cfg = self.cfg
        state = TrainState(self.loader, self.env.rank, self.env.world_size)
        resumed_from = self.resume(state, found)
        budget, progress, config = self.budget, state.progress, to_dict(cfg)
        check_checkpoint_dir(store, self.engine.module, self.env.world_size)
        if self.is_main:
            write_run_config(cfg.run.output_dir, config, progress.step)
        checkpointer = self.build_checkpointer(store, state, resumed_from, config)
        logger = RunLogger(
            cfg,
            enabled=self.is_main,
            run_id=progress.wandb_run_id,
            start_step=progress.step,
            last_step=budget.last_step,
            config_dict=config,
            device=self.env.device,
        )
        guard = BadStepGuard(cfg.train.max_bad_steps, self.env.device)
        meter = Throughput(budget.global_batch_size, self.env.world_size)
        stop = StopRequest().install()
        try:
            while progress.step < budget.last_step and state.stopped_by is None:
                batches = state.epoch_batches()
                self.engine.module.train()
                t0 = time.perf_counter()  # a running clock: between reads it times launches, not the GPU
                while not budget.epoch_done(progress.batches_in_epoch) and progress.step < budget.last_step:
                    schedule, outcome = self.step(batches, progress.step, stop.requested)
                    progress.advance(budget.grad_accum_steps)
                    guard.record(outcome.skipped)
                    if not self.check_due(progress.step, progress.batches_in_epoch, checkpointer):
                        t0 = meter_add(meter, t0, outcome.data_wait_s)
                        continue
                    values = torch.cat([outcome.flags, guard.counts]).tolist()  # the host's one read
                    t0 = meter_add(meter, t0, outcome.data_wait_s)  # the read waited for every step since
                    result = outcome.read(values[:3])
                    progress.bad_steps += guard.take(values[3:])
                    if result.stop:
                        state.stopped_by = stop.signal_name or PEER_SIGNAL
                    logger.log_step(progress, result, schedule, meter)
                    guard.check(progress.step, checkpointer.last)  # after logging: the bad step is in the log
                    checkpointer.save(progress.step, bad_streak=guard.in_a_row > 0, stopping=result.stop)
                    if result.stop:
                        break
                if state.stopped_by is None and budget.epoch_done(progress.batches_in_epoch):
                    self.end_epoch(state, logger, checkpointer, bad_streak=guard.in_a_row > 0)
            checkpointer.save(progress.step, bad_streak=guard.in_a_row > 0, last_step=True)
            logger.log_checkpoint(checkpointer.last)  # to W&B, when logging.wandb.log_checkpoints
        finally:
            stop.uninstall()
            logger.close()
        if self.is_main and state.stopped_by is not None:
            last = checkpointer.last
            print(f"stopped by {state.stopped_by} after step {progress.step}; checkpoint {last}", flush=True)
        return TrainResult(progress.step, progress.epoch, state.stopped_by, checkpointer.last)

    def check_due(self, step: int, batches_in_epoch: int, checkpointer: Checkpointer) -> bool:
        """Whether the host reads the flags after step `step`: at every step that logs a row, may write a
        checkpoint (which needs the bad-step streak) or ends the epoch or the run, and every
        `CHECK_EVERY_STEPS` steps so that a stop signal is obeyed soon. The same steps on every rank."""
        every_log = self.cfg.logging.every_steps
        return (
            step % every_log == 0
            or step % CHECK_EVERY_STEPS == 0
            or step == self.budget.last_step
            or checkpointer.due(step)
            or self.budget.epoch_done(batches_in_epoch)
        )

    def step(
        self, batches: Iterator[Any], step: int, stop_requested: bool = False
    ) -> tuple[dict[str, float], DeviceStep]:
        """Optimizer step `step` of the run: the schedule's lr, weight decay, momentum, then `train_step`."""
        at = step - self.budget.step_offset  # the schedule's position
        values = self.schedule.apply(self.engine.optimizer, at)
        return values, train_step(self.engine, batches, self.ctx, at, stop_requested)

    def resume(self, state: TrainState, found: tuple[str, dict[str, Any]] | None) -> str | None:
        """From the checkpoint `checkpoint.resume` names, if any, once its config is checked against this
        one (pipeline.engine.resume): `state`, the model and the optimizer. Returns the step folder."""
        cfg, budget = self.cfg, self.budget
        if found is None:
            return None
        step_dir, saved = found
        changes = config_changes(saved["config"], cfg, step_dir)
        state.restore(saved)
        progress = state.progress
        point = resume_point(
            progress.step, progress.epoch, state.loader_position, budget.batches_per_epoch,
            budget.grad_accum_steps, cfg.data.batch_size, self.env.world_size,
        )  # fmt: skip
        self.budget = replace(budget, step_offset=point.step_offset)
        check_not_past_end(progress.step, self.budget.last_step, cfg, step_dir)
        self.engine.load(step_dir, saved)
        progress.batches_in_epoch = point.batches_in_epoch
        if progress.batches_in_epoch >= budget.epoch_batches:  # saved at an epoch end
            state.next_epoch()
        if self.is_main:
            for change in changes:
                print(f"resume: {change}", flush=True)
            print(resumed_line(step_dir, saved, progress.step, self.budget.last_step), flush=True)
        return step_dir

    def build_checkpointer(
        self, store: CheckpointStore, state: TrainState, resumed_from: str | None, config: dict[str, Any]
    ) -> Checkpointer:
        """Saves go through the engine (model, optimizer) with `state` captured from every rank and the
        run's config (as a plain dict) beside it."""

        def write(step: int) -> None:
            self.engine.save(store, step, state.capture(config))

        resumed = (state.progress.step, resumed_from) if resumed_from is not None else None
        return Checkpointer(store, self.cfg.checkpoint.every_steps, write, resumed)

    def end_epoch(
        self, state: TrainState, logger: RunLogger, checkpointer: Checkpointer, bad_streak: bool
    ) -> None:
        """The epoch just finished: its row (with the online eval when due), its checkpoint, the next."""
        progress = state.progress
        metrics = self.online_eval(progress.step, progress.epoch, logger)
        logger.log({"step": progress.step, "epoch": progress.epoch, **metrics})
        progress.batches_in_epoch = self.budget.epoch_batches
        checkpointer.save(progress.step, bad_streak=bad_streak, epoch_end=True)
        state.next_epoch()

    def online_eval(self, step: int, epoch: int, logger: RunLogger) -> dict[str, float]:
        """Each `eval.every_epochs`: kNN top-1 on held-out labelled shards, embedding std, embedding map.
        Every rank extracts features for its share; rank 0 gets the metrics, the others an empty dict."""
        every = self.cfg.eval.every_epochs
        if not every or (epoch + 1) % every != 0:
            return {}
        from pipeline.engine.online_eval import evaluate

        out_dir, rank, world_size = Path(self.cfg.run.output_dir), self.env.rank, self.env.world_size
        module, device = self.engine.module, self.env.device
        result = evaluate(self.cfg, module, device, out_dir, epoch, rank=rank, world_size=world_size)
        if self.is_main and "embedding_map" in result:
            logger.log_image("embedding_map", Path(result.pop("embedding_map")), step)
        return {k: v for k, v in result.items() if isinstance(v, float) and not math.isnan(v)}
