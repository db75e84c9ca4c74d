"""What may change when a run resumes from its checkpoint, and where the resumed run stands.

The rule: keys that define *what is learned* are fixed for the life of a run (the model, the method and
its loss, the views the data recipe makes, the seed that orders the samples, the optimizer whose state is
saved, the engine whose checkpoint format is on disk); changing one is refused in one line naming it.
Everything else (schedule and length, batch size and world size, data location and backend, logging,
evaluation, checkpointing) may change and each change is printed as `old -> new`. A different global batch
continues from the samples already consumed, and the step counter stays monotonic: the schedule is read at
the position in the epoch, so a step offset bridges the two units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import Config, from_dict
from pipeline.schema import ConfigError, to_dict

FIXED_ON_RESUME = (
    "model.",
    "method.",
    "data.recipe",
    "data.image_size",
    "data.global_crops",
    "data.local_crops",
    "data.local_image_size",
    "data.augment.",
    "run.seed",
    "optim.name",
    "train.engine",
    "train.deepspeed_config",
)
MAY_CHANGE_ANYWAY = ("method.chunk_size",)  # blockwise evaluation of the same loss: memory only


def _flat(section: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = f"{prefix}{key}"
        out |= _flat(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def _fixed(key: str) -> bool:
    return key.startswith(FIXED_ON_RESUME) and key not in MAY_CHANGE_ANYWAY


def _known_only(saved: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """`saved` without the keys that today's schema (`template`) no longer has."""
    out = {}
    for key, value in saved.items():
        if key in template:
            known = isinstance(value, dict) and isinstance(template[key], dict)
            out[key] = _known_only(value, template[key]) if known else value
    return out


def saved_config(saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The checkpoint's config in today's schema: keys added since take their defaults (what the older
    version did), keys removed since are dropped and returned by name."""
    if saved.get("method", {}).get("name") != now["method"]["name"]:
        return saved, []  # another method: refused by name below
    known = _known_only(saved, now)
    dropped = sorted(set(_flat(saved)) - set(_flat(known)))
    try:
        return to_dict(from_dict(known)), dropped
    except ConfigError:  # a value an older version accepted and this one does not: compare as saved
        return saved, dropped


def config_changes(saved: dict[str, Any], cfg: Config, step_dir: str) -> list[str]:
    """`key: old -> new` for every key that differs from the checkpoint's config; raises ConfigError in
    one line when a key that is fixed for the run differs."""
    now = to_dict(cfg)
    was_cfg, dropped = saved_config(saved, now)
    was, want = _flat(was_cfg), _flat(now)
    keys = sorted((was.keys() | want.keys()) - set(dropped))
    differ = [k for k in keys if was.get(k) != want.get(k)]
    refused = [f"{k} is {was.get(k)!r} there, {want.get(k)!r} here" for k in differ if _fixed(k)]
    if refused:
        raise ConfigError(
            f"checkpoint.resume: {step_dir} was written by another model or recipe ({'; '.join(refused)}); "
            "these keys cannot change within a run: restore them, or start a new run in a new run.output_dir"
        )
    return [f"{k}: {was.get(k)!r} -> {want.get(k)!r}" for k in differ] + [
        f"{k}: no longer a config key, ignored" for k in dropped
    ]


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run continues, in the units of *this* run's batch size and world size."""

    batches_in_epoch: int  # loader batches per rank already consumed in the epoch
    step_offset: int  # optimizer steps taken minus the step the schedule is at (0 unless the batch changed)


def resume_point(
    step: int,
    epoch: int,
    loader_state: dict[str, Any],
    batches_per_epoch: int,
    accum: int,
    batch_size: int,
    world_size: int,
) -> ResumePoint:
    """Convert the saved loader position (counted in global samples) to this run's batches, and the
    optimizer-step counter to the schedule's position, so that neither the loader nor the schedule
    repeats or skips more than one batch when data.batch_size or the world size changed."""
    from pipeline.data.contract import Position

    position = Position(batches_per_epoch)
    position.load_state_dict(loader_state, batch_size, world_size)
    steps_per_epoch = batches_per_epoch // accum
    at = epoch * steps_per_epoch + min(position.batches_consumed // accum, steps_per_epoch)
    return ResumePoint(position.batches_consumed, step - at)


def check_not_past_end(step: int, last_step: int, cfg: Config, step_dir: str) -> None:
    """A checkpoint beyond the end this config asks for would otherwise exit 0 having done nothing."""
    if step > last_step:
        raise ConfigError(
            f"checkpoint.resume: {step_dir} is at step {step}, past this run's end at step {last_step} "
            f"(train.epochs={cfg.train.epochs}, train.max_steps={cfg.train.max_steps}); raise train.epochs "
            "or train.max_steps, or start a new run in a new run.output_dir"
        )


def resumed_line(step_dir: str, saved: dict[str, Any], step: int, last_step: int) -> str:
    """Rank 0's line on resuming: from where, and why the run before stopped; a run that had already
    reached this config's last step says so (it exits 0 having nothing to do) instead of calling that
    end a crash."""
    from pipeline.engine.preemption import resume_reason

    if step == last_step:
        return (
            f"resumed from {step_dir} at step {step}: the run is finished (step {step} is its last step); "
            "nothing to do: raise train.max_steps or train.epochs to train longer"
        )
    if step == saved.get("config", {}).get("train", {}).get("max_steps"):
        return f"resumed from {step_dir} at step {step} (the run before reached its train.max_steps)"
    return f"resumed from {step_dir} at step {step} ({resume_reason(saved)})"
