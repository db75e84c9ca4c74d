"""The training loop: read top to bottom, assembled by small build_* functions.

One optimizer step = `train.grad_accum_steps` loader batches per rank. The loss and its non-finite flag
stay on the device across the micro-batches; before the update one small all-reduce of (loss sum,
non-finite count, stop flag) and one read of it on the host give the global mean loss for logging and let
every rank take the same decision to skip a NaN step or to stop after a signal, so ranks never diverge.
That read is the step's only host sync: the gradient norm stays a tensor until a logging step reads it.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline.config import Config, to_dict
from pipeline.engine.checkpoint import CheckpointStore, find_state
from pipeline.engine.health import BadStepGuard
from pipeline.engine.logger import RunLogger, new_run_id
from pipeline.engine.preemption import PEER_SIGNAL, StopRequest, resume_reason
from pipeline.engine.preflight import check_checkpoint_dir, lock_run_folder, write_run_config
from pipeline.engine.resume import check_not_past_end, config_changes, resume_point


class Engine(Protocol):
    """What the loop needs from `ddp` and `deepspeed`; the method never sees which one runs it."""

    module: nn.Module  # the plain method (eval, checkpoints, its hooks)
    optimizer: torch.optim.Optimizer  # the client optimizer; the schedule writes into its param_groups

    def forward(self, views: list[torch.Tensor], labels: torch.Tensor | None, *, sync: bool) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> torch.Tensor | float: ...
    def skip(self) -> None: ...
    def save(self, store: CheckpointStore, step: int, state: dict[str, Any] | None) -> None: ...
    def load(self, step_dir: str, state: dict[str, Any]) -> None: ...


@dataclass
class Progress:
    """Where the run is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # loader batches consumed in `epoch`, per rank
    wandb_run_id: str = field(default_factory=new_run_id)
    bad_steps: int = 0

    @classmethod
    def from_saved(cls, saved: dict[str, Any]) -> Progress:
        """Fields this version knows; a checkpoint from an older or newer version still resumes."""
        return cls(**{k: v for k, v in saved.items() if k in cls.__dataclass_fields__})


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


def build_engine(cfg: Config, method: nn.Module, device: torch.device, global_batch_size: int) -> Engine:
    from pipeline.optim import build_optimizer

    def make_optimizer(module: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg.optim, module, global_batch_size)

    if device.type == "cuda" and cfg.train.channels_last:
        method = method.to(memory_format=torch.channels_last)
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
    CUDA (e.g. the backward of adaptive average pooling and of nll_loss) warn once and run anyway, so
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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def checkpoint_root(cfg: Config) -> str:
    return cfg.checkpoint.dir or str(Path(cfg.run.output_dir) / "checkpoints")


def find_resume(cfg: Config, store: CheckpointStore, warn: bool) -> tuple[str | None, dict[str, Any] | None]:
    """(step folder, state) to resume from: the newest intact under the root (`auto`; damaged newer ones
    are named in a warning), an explicit path, or (None, None)."""

    def say(message: str) -> None:
        if warn:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    if cfg.checkpoint.resume == "none":
        return None, None
    if cfg.checkpoint.resume == "auto":
        return store.newest_intact(say) or (None, None)
    return find_state(cfg.checkpoint.resume, say)


def _all_gather_objects(obj: Any, world_size: int) -> list[Any]:
    if world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _global_flags(
    loss_sum: torch.Tensor, n_bad: torch.Tensor, stop: bool, world_size: int
) -> tuple[float, bool, bool]:
    """(loss sum over ranks, every rank finite, any rank asked to stop): one all-reduce, one host read.

    `loss_sum` and `n_bad` are device scalars (finite losses summed, non-finite ones counted); the stop
    flag joins them on the device with a fill, not a pageable host-to-device copy."""
    flags = torch.stack([loss_sum, n_bad, torch.full_like(loss_sum, float(stop))])
    if world_size > 1:
        backend_device = flags.device if dist.get_backend() == "nccl" else torch.device("cpu")
        on_backend = flags.to(backend_device)
        dist.all_reduce(on_backend)
        flags = on_backend
    total, bad, stops = flags.tolist()  # the step's one host sync
    return total, bad == 0, stops > 0


def _scalar(value: Any) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


# ---------------------------------------------------------------------------------------------- one step


@dataclass(frozen=True)
class StepContext:
    """What every step needs and no step changes."""

    device: torch.device
    precision: contextlib.AbstractContextManager
    channels_last: bool
    grad_accum_steps: int
    world_size: int
    total_steps: int


@dataclass
class StepLog:
    loss: float  # mean over ranks and micro-batches (NaN when the step was skipped)
    finite: bool  # False: a rank saw a NaN/Inf loss and every rank skipped the update
    stop: bool  # some rank got SIGTERM/SIGINT
    grad_norm: torch.Tensor | float  # a device tensor: read it (a host sync) only when logging
    data_wait_s: float
    logs: dict[str, Any]  # the method's logs (+ after_optimizer_step's, e.g. ema_momentum), tensors unread


def train_step(
    engine: Engine, batches: Iterator[Any], ctx: StepContext, step: int, stop_requested: bool
) -> StepLog:
    """One optimizer step over `grad_accum_steps` micro-batches; the update is skipped on any NaN/Inf.

    Every micro-batch runs its backward (a NaN only poisons gradients that are then dropped), so all
    ranks enter the same gradient reductions; the skip/stop decision is taken once, before the update."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    n_bad = torch.zeros((), dtype=torch.float64, device=ctx.device)
    logs: dict[str, Any] = {}
    wait = 0.0
    for micro in range(ctx.grad_accum_steps):
        t_wait = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t_wait
        views = [v.to(ctx.device, non_blocking=True) for v in batch.views]  # V x (B, 3, H, W)
        if ctx.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        labels = batch.labels.to(ctx.device, non_blocking=True) if batch.labels is not None else None
        with ctx.precision:
            loss, method_logs = engine.forward(views, labels, sync=micro == ctx.grad_accum_steps - 1)
        value = loss.detach().double()
        finite = torch.isfinite(value)
        loss_sum += torch.where(finite, value, 0.0)
        n_bad += (~finite).double()
        engine.backward(loss)
        logs.update(method_logs)
    total, finite_step, stop = _global_flags(loss_sum, n_bad, stop_requested, ctx.world_size)
    if not finite_step:
        engine.skip()
        return StepLog(float("nan"), False, stop, float("nan"), wait, logs)
    engine.module.after_backward(step, ctx.total_steps)  # the method's gradient edits, before clipping
    grad_norm = engine.step()
    logs.update(engine.module.after_optimizer_step(step, ctx.total_steps))  # e.g. EMA targets follow
    return StepLog(total / (ctx.world_size * ctx.grad_accum_steps), True, stop, grad_norm, wait, logs)


class Throughput:
    """Step time, images/s and data-wait fraction averaged over the steps since the last log row."""

    def __init__(self) -> None:
        self.time, self.wait, self.steps = 0.0, 0.0, 0

    def add(self, step_time: float, wait: float) -> None:
        self.time, self.wait, self.steps = self.time + step_time, self.wait + wait, self.steps + 1

    def row(self, global_batch_size: int, world_size: int) -> dict[str, float]:
        per_step = self.time / max(self.steps, 1)
        row = {
            "images_per_s": global_batch_size / per_step,
            "images_per_s_per_gpu": global_batch_size / world_size / per_step,
            "data_wait_frac": self.wait / self.time if self.time else 0.0,
            "step_time_s": per_step,
        }
        self.__init__()
        return row


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config) -> TrainResult:
    """Run (or resume) the whole training described by `cfg`; returns when done or preempted. Rank 0
    holds the run folder's lock throughout: a second training into the same run.output_dir is refused."""
    from pipeline.distributed import init_from_env

    env = init_from_env(cfg.train.collective_timeout_s)
    lock = lock_run_folder(cfg.run.output_dir, env.rank == 0, env.world_size)
    try:
        return _train(cfg, env)
    finally:
        lock.release()


def _train(cfg: Config, env: Any) -> TrainResult:
    from pipeline.data import build_loader
    from pipeline.data.contract import memory_format
    from pipeline.methods import build_method
    from pipeline.optim import build_schedule

    rank, world_size, device = env.rank, env.world_size, env.device
    is_main = rank == 0
    seed_everything(cfg.run.seed, cfg.run.deterministic)

    # Data: batches per epoch per rank, and the step budget derived from it.
    fmt = memory_format(cfg.train.channels_last, device)
    loader = build_loader(
        cfg.data,
        split="train",
        rank=rank,
        world_size=world_size,
        seed=cfg.run.seed,
        device=device,
        memory_format=fmt,
    )
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(loader) // accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"an epoch has {len(loader)} batches per rank, fewer than train.grad_accum_steps={accum}"
        )
    total_steps = steps_per_epoch * cfg.train.epochs
    last_step = min(total_steps, cfg.train.max_steps or total_steps)
    global_batch_size = cfg.data.batch_size * world_size * accum

    # Model, engine, schedule.
    method = build_method(cfg)
    engine = build_engine(cfg, method, device, global_batch_size)
    schedule = build_schedule(cfg.optim, total_steps, steps_per_epoch, global_batch_size)
    precision = build_precision(cfg, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last

    # Resume: check the config against the checkpoint's (pipeline.engine.resume), model/optimizer
    # through the engine, then where we were (in this run's batches) and the RNG streams.
    store = CheckpointStore(checkpoint_root(cfg), keep_last=cfg.checkpoint.keep_last)
    progress = Progress()
    resume_dir, state = find_resume(cfg, store, warn=is_main)
    loader_state = None
    step_offset = 0  # steps taken minus the schedule's position: non-zero after a global-batch change
    if resume_dir is not None:
        changes = config_changes(state["config"], cfg, resume_dir)
        progress = Progress.from_saved(state["progress"])
        loader_state = state["loader"][rank % len(state["loader"])]  # DALI reader state is per rank
        point = resume_point(
            progress.step, progress.epoch, loader_state, len(loader), accum, cfg.data.batch_size, world_size
        )
        progress.batches_in_epoch, step_offset = point.batches_in_epoch, point.step_offset
        last_step = min(total_steps + step_offset, cfg.train.max_steps or total_steps + step_offset)
        check_not_past_end(progress.step, last_step, cfg, resume_dir)
        engine.load(resume_dir, state)
        set_rng_state(state["rng"][rank % len(state["rng"])])
        if progress.batches_in_epoch >= steps_per_epoch * accum:  # saved at an epoch end
            progress.epoch, progress.batches_in_epoch, loader_state = progress.epoch + 1, 0, None
        if is_main:
            for change in changes:
                print(f"resume: {change}", flush=True)
    check_checkpoint_dir(store, engine.module, world_size)
    if is_main:
        write_run_config(cfg.run.output_dir, to_dict(cfg), progress.step)

    logger = RunLogger(
        cfg,
        enabled=is_main,
        run_id=progress.wandb_run_id,
        start_step=progress.step,
        total_steps=last_step,
        config_dict=to_dict(cfg),
    )
    if is_main and resume_dir is not None:
        print(f"resumed from {resume_dir} at step {progress.step} ({resume_reason(state)})", flush=True)
    guard = BadStepGuard(cfg.train.max_bad_steps, total_bad=progress.bad_steps, last_checkpoint=resume_dir)
    stop = StopRequest().install()
    last_checkpoint: str | None = resume_dir

    def save_checkpoint() -> str:
        progress.bad_steps = guard.total_bad
        rngs = _all_gather_objects(rng_state(), world_size)
        loaders = _all_gather_objects(loader.state_dict(), world_size)
        state = None
        if is_main:
            state = {
                "progress": vars(progress).copy(),
                "step": progress.step,
                "epoch": progress.epoch,
                "loader": loaders,
                "rng": rngs,
                "config": to_dict(cfg),
                "wandb_run_id": progress.wandb_run_id,
                "stopped_by": stopped_by,
            }
        engine.save(store, progress.step, state)
        guard.last_checkpoint = f"{store.root}/step-{progress.step:08d}"
        return guard.last_checkpoint

    saved_step = progress.step if resume_dir is not None else -1
    ctx = StepContext(device, precision, channels_last, accum, world_size, total_steps)
    meter = Throughput()
    stopped_by: str | None = None
    try:
        while progress.step < last_step and stopped_by is None:
            if loader_state is not None:
                loader.load_state_dict(loader_state)  # mid-epoch resume: the rest of that epoch
                loader_state = None
            else:
                loader.set_epoch(progress.epoch)
            batches = iter(loader)
            engine.module.train()
            while progress.batches_in_epoch + accum <= steps_per_epoch * accum and progress.step < last_step:
                t0 = time.perf_counter()
                sched = schedule.apply(engine.optimizer, progress.step - step_offset)  # lr, wd, momentum
                result = train_step(engine, batches, ctx, progress.step - step_offset, stop.requested)
                progress.step += 1
                progress.batches_in_epoch += accum
                guard.record(result.finite)
                if result.stop:
                    stopped_by = stop.signal_name or PEER_SIGNAL
                meter.add(time.perf_counter() - t0, result.data_wait_s)

                if progress.step % cfg.logging.every_steps == 0 or progress.step == last_step:
                    row = {
                        "step": progress.step,
                        "epoch": progress.epoch,
                        "loss": result.loss,
                        **sched,
                        "grad_norm": _scalar(result.grad_norm),
                        **meter.row(global_batch_size, world_size),
                        "bad_steps": guard.total_bad,
                        **{k: _scalar(v) for k, v in result.logs.items()},
                    }
                    if device.type == "cuda":
                        row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    logger.log(row)
                    logger.progress(progress.step, loss=row["loss"])

                guard.check(progress.step)  # after logging, so the last bad step is in metrics.jsonl
                every = cfg.checkpoint.every_steps
                due = stopped_by is not None or (every and progress.step % every == 0)
                if due and guard.in_a_row == 0:  # never overwrite good checkpoints with a diverging state
                    last_checkpoint, saved_step = save_checkpoint(), progress.step
                if stopped_by is not None:
                    break

            if stopped_by is None and progress.batches_in_epoch + accum > steps_per_epoch * accum:
                epoch_row = {"step": progress.step, "epoch": progress.epoch}
                epoch_row.update(online_eval(cfg, engine.module, device, progress, logger, is_main))
                logger.log(epoch_row)
                progress.batches_in_epoch = steps_per_epoch * accum
                if saved_step != progress.step and guard.in_a_row == 0:
                    last_checkpoint, saved_step = save_checkpoint(), progress.step  # epoch end
                progress.epoch += 1
                progress.batches_in_epoch = 0
        if saved_step != progress.step and guard.in_a_row == 0:
            last_checkpoint, saved_step = save_checkpoint(), progress.step  # max_steps mid-epoch
    finally:
        stop.uninstall()
        logger.close()
    if is_main and stopped_by is not None:
        print(f"stopped by {stopped_by} after step {progress.step}; checkpoint {last_checkpoint}", flush=True)
    return TrainResult(progress.step, progress.epoch, stopped_by, last_checkpoint)


def online_eval(
    cfg: Config, method: nn.Module, device: torch.device, progress: Progress, logger: RunLogger, is_main: bool
) -> dict[str, float]:
    """Each `eval.every_epochs`: kNN top-1 on held-out labelled shards, embedding std, embedding map.
    Every rank extracts features for its share; rank 0 gets the metrics, the others an empty dict."""
    every = cfg.eval.every_epochs
    if not every or (progress.epoch + 1) % every != 0:
        return {}
    from pipeline.engine.online_eval import evaluate

    distributed = dist.is_initialized() and dist.get_world_size() > 1
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    out_dir = Path(cfg.run.output_dir)
    result = evaluate(cfg, method, device, out_dir, progress.epoch, rank=rank, world_size=world_size)
    if is_main and "embedding_map" in result:
        logger.log_image("embedding_map", Path(result.pop("embedding_map")), progress.step)
    return {k: v for k, v in result.items() if isinstance(v, float) and not math.isnan(v)}
