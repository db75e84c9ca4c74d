"""Config sections of the training engine: train, checkpoint, logging (+ W&B)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.config import Config


@dataclass(frozen=True)
class TrainConfig:
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero1.json"  # ZeRO stage etc.; batch/clip/bf16 come from here
    epochs: int = 100
    max_steps: int | None = None  # stop early (debug, benchmarks); the schedule still spans `epochs`
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    channels_last: bool = True  # only applied on CUDA, where it speeds up convolutions
    compile: bool = False  # torch.compile the method (CUDA only; ignored on the CPU)
    grad_accum_steps: int = 1
    grad_clip: float | None = None  # max global grad norm
    sync_bn: bool = False  # DDP only: convert BatchNorm to SyncBatchNorm
    max_bad_steps: int = 5  # this many non-finite losses in a row stop the run
    collective_timeout_s: int = 600  # a dead rank surfaces as an error after this long, not a hang

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ConfigError(f"train.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"train.max_steps must be >= 1 or null, got {self.max_steps}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip must be > 0 or null, got {self.grad_clip}")
        if self.max_bad_steps < 1:
            raise ConfigError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if self.collective_timeout_s < 1:
            raise ConfigError(f"train.collective_timeout_s must be >= 1, got {self.collective_timeout_s}")
        if self.engine == "deepspeed" and self.sync_bn:
            raise ConfigError("train.sync_bn is supported with train.engine=ddp only")


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # local path or fsspec URL (s3://...); default {run.output_dir}/checkpoints
    every_steps: int | None = 1000  # also saved at each epoch end and on SIGTERM/SIGINT
    keep_last: int = 3
    resume: str = "auto"  # "auto" (newest complete checkpoint, if any), "none", or a checkpoint path/URL

    def __post_init__(self) -> None:
        if self.every_steps is not None and self.every_steps < 1:
            raise ConfigError(f"checkpoint.every_steps must be >= 1 or null, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")
        if not self.resume:
            raise ConfigError("checkpoint.resume must be 'auto', 'none' or a checkpoint path")


@dataclass(frozen=True)
class WandbConfig:
    project: str = "contrastive-pipeline"
    entity: str | None = None
    name: str | None = None  # default: run.name
    tags: tuple[str, ...] = ()
    group: str | None = None
    mode: Literal["online", "offline", "disabled"] = "offline"  # online falls back to offline without a key


@dataclass(frozen=True)
class LoggingConfig:
    every_steps: int = 10  # metrics.jsonl / W&B row every N optimizer steps
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"logging.every_steps must be >= 1, got {self.every_steps}")


def resolve_deepspeed_config(path: str) -> Path:
    """A relative path is looked up from the working directory, then from the repository root."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    in_repo = Path(__file__).resolve().parents[2] / candidate
    return in_repo if in_repo.exists() else candidate


def deepspeed_stage(path: str) -> int:
    """ZeRO stage named in a DeepSpeed JSON config (0 when absent)."""
    try:
        ds = json.loads(resolve_deepspeed_config(path).read_text())
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed_config: {path} is not valid JSON: {e}") from e
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise ConfigError(f"train.deepspeed_config: ZeRO stage {stage} in {path}; supported: 0, 1, 2")
    return stage


def check_combinations(cfg: Config) -> None:
    """Cross-section checks: combinations that would fail or silently do the wrong thing later."""
    if cfg.train.engine == "deepspeed":
        stage = deepspeed_stage(cfg.train.deepspeed_config)
        if stage >= 1 and cfg.optim.name == "lars":
            # ZeRO hands the client optimizer flat partitions: LARS's per-layer trust ratio would be wrong.
            raise ConfigError(
                f"optim.name=lars cannot run under ZeRO stage {stage} (per-layer norms are split across "
                "partitions); use train.engine=ddp, ZeRO stage 0, or optim.name=sgd/adamw"
            )
        if stage >= 1 and getattr(cfg.method, "edits_gradients", False):  # see pipeline.methods.base
            raise ConfigError(
                f"method.name={cfg.method.name} edits whole gradients or weights between backward and the "
                f"optimizer step, which ZeRO stage {stage} partitions; use train.engine=ddp or "
                "train.deepspeed_config=configs/deepspeed/zero0.json"
            )
    if cfg.eval.every_epochs and cfg.data.val_shards is None:
        raise ConfigError("eval.every_epochs > 0 needs data.val_shards (labelled held-out shards for kNN)")
