"""`python -m bench step`: training images/s fed by the real pipeline vs. the synthetic ceiling.

In one process and one run, the trainer's own step (`Trainer.build` from the config and its overrides,
then `Trainer.step`: the schedule and `train_step` with its hooks, no host read): (1) on
device-resident random batches of the loader's shapes (the ceiling: no decode, no augmentation, no
host-to-device copy), then (2) fed by shards -> loader of any `data.backend`. Each is timed over
`--steps` steps after `--warmup` untimed ones. Prints one JSON object with both rates and their ratio.
The default config is the tiny CPU debug run.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import torch

from pipeline.config import load
from pipeline.data import Batch

EXAMPLES = """examples:
  python -m bench step data.train_shards=/tmp/shards
  python -m bench step --config configs/imagenet_simclr.yaml data.backend=dali \\
      data.train_shards=/data/imagenet-shards data.batch_size=256
  python -m bench step --config configs/cifar10_simclr.yaml data.backend=cpu data.train_shards=/data/c10
"""


def _timed_steps(step_fn, steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` steps after `warmup` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _forever(loader) -> Iterator[Batch]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench step", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before each measurement")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    overrides = ["logging.wandb.mode=disabled", *args.overrides]
    if not any(o.startswith("run.output_dir=") for o in overrides):
        overrides.append("run.output_dir=/tmp/bench-step")
    cfg = load(args.config, overrides)

    from pipeline.distributed import init_from_env, leave_process_group
    from pipeline.engine.trainer import Trainer

    env = init_from_env(cfg.train.collective_timeout_s)
    device = env.device
    trainer = Trainer.build(cfg, env)  # the training run's own loader, engine, schedule and step context
    global_batch_size = trainer.budget.global_batch_size
    step_index = 0

    def make_step(batches: Iterator[Batch]):
        def step() -> None:  # what the training loop does per step
            nonlocal step_index
            trainer.step(batches, step_index)
            step_index += 1

        return step

    real = _forever(trainer.loader)
    first = next(real)
    synthetic_batch = Batch(
        views=[torch.randn_like(v, device=device) for v in first.views],
        labels=first.labels.to(device) if first.labels is not None else None,
    )

    def synthetic() -> Iterator[Batch]:
        while True:
            yield synthetic_batch

    trainer.engine.module.train()
    synthetic_s = _timed_steps(make_step(synthetic()), args.steps, args.warmup, device)
    pipeline_s = _timed_steps(make_step(real), args.steps, args.warmup, device)
    images = args.steps * global_batch_size
    row = {
        "bench": "step",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "world_size": env.world_size,
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "backend": cfg.data.backend,
        "image_size": cfg.data.image_size,
        "views": len(first.views),
        "global_batch_size": global_batch_size,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "synthetic_images_per_s": round(images / synthetic_s, 2),
        "pipeline_images_per_s": round(images / pipeline_s, 2),
        "ratio": round(synthetic_s / pipeline_s, 4),
    }
    if env.rank == 0:
        print(json.dumps(row), flush=True)
    leave_process_group(completed=True)
    return 0
