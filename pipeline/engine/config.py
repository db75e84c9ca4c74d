"""Config sections of the training engine: train, checkpoint, logging (+ W&B)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pipeline.schema import Bound, ConfigError, Section


@dataclass(frozen=True)
class TrainConfig(Section, key="train"):
    engine: Literal["ddp", "deepspeed"] = "ddp"
    deepspeed_config: str = "configs/deepspeed/zero1.json"  # ZeRO stage etc.; batch/clip/bf16 come from here
    epochs: Annotated[int, Bound(ge=1)] = 100
    # stop early (debug, benchmarks); the schedule still spans `epochs`
    max_steps: Annotated[int, Bound(ge=1)] | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on the CPU
    channels_last: bool = True  # only applied on CUDA, where it speeds up convolutions
    compile: bool = False  # torch.compile the method (CUDA only; ignored on the CPU)
    grad_accum_steps: Annotated[int, Bound(ge=1)] = 1
    grad_clip: Annotated[float, Bound(gt=0)] | None = None  # max global grad norm
    sync_bn: bool = False  # DDP only: convert BatchNorm to SyncBatchNorm
    max_bad_steps: Annotated[int, Bound(ge=1)] = 5  # this many non-finite losses in a row stop the run
    # a dead rank surfaces as an error after this long, not a hang
    collective_timeout_s: Annotated[int, Bound(ge=1)] = 600

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine == "deepspeed" and self.sync_bn:
            raise ConfigError("train.sync_bn is supported with train.engine=ddp only")


@dataclass(frozen=True)
class CheckpointConfig(Section, key="checkpoint"):
    dir: str | None = None  # local path or fsspec URL (s3://...); default {run.output_dir}/checkpoints
    # also saved at each epoch end and on SIGTERM/SIGINT
    every_steps: Annotated[int, Bound(ge=1)] | None = 1000
    keep_last: Annotated[int, Bound(ge=1)] = 3
    resume: str = "auto"  # "auto" (newest complete checkpoint, if any), "none", or a checkpoint path/URL

    def __post_init__(self) -> None:
        super().__post_init__()
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
    log_checkpoints: bool = False  # the run's last checkpoint as a W&B model artifact (s3://: a reference)


@dataclass(frozen=True)
class LoggingConfig(Section, key="logging"):
    every_steps: Annotated[int, Bound(ge=1)] = 10  # metrics.jsonl / W&B row every N optimizer steps
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


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
    if not isinstance(ds, dict):
        raise ConfigError(
            f"train.deepspeed_config: {path} holds a JSON {type(ds).__name__}, not an object of DeepSpeed "
            "settings; see configs/deepspeed/zero1.json"
        )
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError(
            f"train.deepspeed_config: zero_optimization in {path} is {json.dumps(zero)}, not an object; "
            'write {"stage": 0|1|2} as in configs/deepspeed/zero1.json'
        )
    stage = zero.get("stage", 0)
    # JSON's true is Python's True == 1 and "1" is a string: only the integers themselves are stages
    if type(stage) is not int or stage not in (0, 1, 2):
        raise ConfigError(
            f"train.deepspeed_config: zero_optimization.stage in {path} is {json.dumps(stage)}; "
            "supported: the integers 0, 1, 2"
        )
    return stage
