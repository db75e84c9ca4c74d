"""What the user sees of a run: metrics.jsonl, W&B and a console progress bar, all on rank 0 only.

The loop hands each step's `StepLog`, schedule values, `Throughput` and `Progress` to `log_step`, which
lays out the row (W&B panels and tests read its keys) and the progress bar. metrics.jsonl keeps flat
names; W&B gets them in panel groups (`wandb_key`: train/, val/, sys/; `pipeline.eval` adds eval/) against
the optimizer step as the x axis, with the best kNN/linear top-1 as the run's summary."""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.engine.state import Progress

METRICS_FILE = "metrics.jsonl"
WANDB_INIT_TIMEOUT_S = 15  # wandb's own default (90 s) keeps a run with a bad key or no network waiting
STEP_METRIC = "step"  # the optimizer step: every W&B panel's x axis
SYS_KEYS = ("images_per_s", "images_per_s_per_gpu", "data_wait_frac", "step_time_s", "gpu_mem_gib")
VAL_KEYS = ("knn_top1", "embed_std", "eval_time_s", "embedding_map")  # pipeline.engine.online_eval
CUDA_ONLY_KEYS = ("sys/gpu_mem_gib",)
BEST_IS_MAX = ("val/knn_top1", "eval/knn_top1", "eval/linear_top1")  # their W&B summary is the best value


class LoggingError(RuntimeError):
    """W&B `online` could not start (bad key, no network): one line, exit 2, before any step."""


@dataclass
class StepLog:
    """What one optimizer step reports."""

    loss: float  # mean over ranks and micro-batches (NaN when the step was skipped)
    finite: bool  # False: a rank saw a NaN/Inf loss and every rank skipped the update
    stop: bool  # some rank got SIGTERM/SIGINT
    grad_norm: torch.Tensor | float  # a device tensor: read it (a host sync) only when logging
    data_wait_s: float
    logs: dict[str, Any]  # the method's logs (+ after_optimizer_step's, e.g. ema_momentum), tensors unread


class Throughput:
    """Step time, images/s and data-wait fraction averaged over the steps since the last `take`."""

    def __init__(self, global_batch_size: int, world_size: int) -> None:
        self.global_batch_size, self.world_size = global_batch_size, world_size
        self.time, self.wait, self.steps = 0.0, 0.0, 0

    def add(self, step_time: float, wait: float) -> None:
        self.time, self.wait, self.steps = self.time + step_time, self.wait + wait, self.steps + 1

    def take(self) -> dict[str, float]:
        """The averages so far; the next ones start from zero."""
        per_step = self.time / max(self.steps, 1)
        row = {
            "images_per_s": self.global_batch_size / per_step,
            "images_per_s_per_gpu": self.global_batch_size / self.world_size / per_step,
            "data_wait_frac": self.wait / self.time if self.time else 0.0,
            "step_time_s": per_step,
        }
        self.time, self.wait, self.steps = 0.0, 0.0, 0
        return row


def _scalar(value: Any) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def wandb_key(key: str) -> str:
    """A metrics.jsonl key's W&B name: sys/ throughput and memory, val/ the online eval, train/ the rest."""
    return f"{'sys' if key in SYS_KEYS else 'val' if key in VAL_KEYS else 'train'}/{key}"


def define_metrics(run: Any) -> None:
    """The optimizer step as every group's x axis (so `pipeline.eval` can log into a resumed run at the
    checkpoint's step), and the best, not the last, kNN/linear top-1 in the run's summary."""
    run.define_metric(STEP_METRIC)
    for group in ("train", "val", "sys", "eval"):
        run.define_metric(f"{group}/*", step_metric=STEP_METRIC)
    for key in BEST_IS_MAX:
        run.define_metric(key, step_metric=STEP_METRIC, summary="max")


def wandb_mode(configured: str) -> str:
    """`online` without any API key configured would prompt or fail: fall back to offline."""
    if configured != "online":
        return configured
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth.wbnetrc import read_netrc_auth

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        return "online" if read_netrc_auth(host=host) else "offline"
    except Exception:  # a broken netrc must not stop training: log locally
        return "offline"


class RunLogger:
    """Rank 0 writes rows to metrics.jsonl and W&B and drives the progress bar; other ranks do nothing.
    A step's row goes out every `logging.every_steps` and at the run's last step."""

    def __init__(
        self,
        cfg: Any,
        *,
        enabled: bool,
        run_id: str,
        start_step: int,
        last_step: int,
        config_dict: dict[str, Any],
        device: torch.device,
    ) -> None:
        self.enabled = enabled
        self.every_steps, self.last_step, self.device = cfg.logging.every_steps, last_step, device
        self.log_checkpoints = cfg.logging.wandb.log_checkpoints
        self.wandb_run = None
        self.bar = None
        if not enabled:
            return
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = out / METRICS_FILE
        _drop_rows_after(self.metrics_path, start_step)  # rows a killed run logged past its checkpoint
        self.metrics = self.metrics_path.open("a")
        wb = cfg.logging.wandb
        mode = wandb_mode(wb.mode)
        if mode != "disabled":
            import wandb

            timeout = {} if "WANDB_INIT_TIMEOUT" in os.environ else {"init_timeout": WANDB_INIT_TIMEOUT_S}
            try:
                self.wandb_run = wandb.init(
                    project=wb.project,
                    entity=wb.entity,
                    name=wb.name or cfg.run.name,
                    tags=list(wb.tags),
                    group=wb.group or cfg.run.name,  # one per job, however many nodes
                    job_type="pretrain",
                    mode=mode,
                    id=run_id,
                    resume="allow",
                    dir=str(out),
                    config=config_dict,
                    settings=wandb.Settings(console="off", silent=True, **timeout),
                )
            except wandb.errors.Error as e:  # bad key, no network, init timeout
                self.metrics.close()
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                raise LoggingError(
                    f"logging.wandb.mode={mode}: W&B did not start ({reason}); check WANDB_API_KEY and the "
                    "network, or use logging.wandb.mode=offline and `wandb sync` later"
                ) from None
            define_metrics(self.wandb_run)
        if cfg.logging.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(
                total=last_step, initial=start_step, unit="step", file=sys.stderr, dynamic_ncols=True
            )

    def log(self, row: dict[str, Any]) -> None:
        """One row; `row["step"]` is the optimizer step it belongs to."""
        if not self.enabled:
            return
        self.metrics.write(json.dumps(strict_json(row), allow_nan=False) + "\n")
        self.metrics.flush()
        if self.wandb_run is not None:
            grouped = {wandb_key(k): v for k, v in row.items() if k != STEP_METRIC}
            self.wandb_run.log({STEP_METRIC: row["step"], **grouped}, step=row["step"])

    def log_step(
        self, progress: Progress, result: StepLog, schedule: dict[str, float], throughput: Throughput
    ) -> None:
        """The row of the step just done (`progress.step`), when one is due. Reads the gradient norm and
        the method's logs: the only host syncs besides the step's own."""
        if progress.step % self.every_steps != 0 and progress.step != self.last_step:
            return
        row = {
            "step": progress.step,
            "epoch": progress.epoch,
            "loss": result.loss,
            **schedule,
            "grad_norm": _scalar(result.grad_norm),
            **throughput.take(),
            "bad_steps": progress.bad_steps,
            **{k: _scalar(v) for k, v in result.logs.items()},
        }
        if self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.log(row)
        self.progress(progress.step, loss=result.loss)

    def log_image(self, key: str, path: Path, step: int) -> None:
        if self.enabled and self.wandb_run is not None:
            import wandb

            self.wandb_run.log({STEP_METRIC: step, wandb_key(key): wandb.Image(str(path))}, step=step)

    def log_checkpoint(self, step_dir: str | None) -> None:
        """The run's last checkpoint as a W&B `model` artifact when `logging.wandb.log_checkpoints`: the
        files of a local folder, a reference (not a copy) for `s3://`. Aliases `latest` and its step."""
        if not (self.enabled and self.wandb_run is not None and self.log_checkpoints and step_dir):
            return
        import wandb

        from pipeline.engine.checkpoint import is_local

        name = step_dir.rstrip("/").rsplit("/", 1)[-1]  # step-00000042
        artifact = wandb.Artifact(
            f"checkpoint-{self.wandb_run.id}", type="model", metadata={"step": int(name.rsplit("-", 1)[-1])}
        )
        if is_local(step_dir):
            artifact.add_dir(step_dir.removeprefix("file://"))
        else:
            artifact.add_reference(step_dir)
        self.wandb_run.log_artifact(artifact, aliases=["latest", name])

    def progress(self, step: int, **postfix: float) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        self.metrics.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def strict_json(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and +-Inf (a skipped step's loss) as null: JSON has no such numbers; strict readers refuse them."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _drop_rows_after(path: Path, step: int) -> None:
    if not path.exists():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
