"""`python -m bench step`: training images/s fed by the real pipeline vs. the synthetic ceiling.

In one process and one run: (1) the method's full training step on device-resident random batches of
the loader's shapes (the ceiling: no decode, no augmentation, no host-to-device copy), then (2) the same
step fed by shards -> loader (DALI on a GPU with `data.backend=dali`, CPU workers otherwise). Prints one
JSON object with both rates and their ratio. The default config is the tiny CPU debug run.
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
  python -m bench step --config configs/imagenet_simclr.yaml --steps 50 data.backend=dali \\
      data.train_shards=/data/imagenet-shards data.batch_size=256
"""


def _timed_steps(step_fn, batches: Iterator[Batch], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` steps after `warmup` untimed ones (synchronised on CUDA)."""
    for _ in range(warmup):
        step_fn(next(batches))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step_fn(next(batches))
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
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    overrides = ["logging.wandb.mode=disabled", *args.overrides]
    if not any(o.startswith("run.output_dir=") for o in overrides):
        overrides.append("run.output_dir=/tmp/bench-step")
    cfg = load(args.config, overrides)

    from pipeline.data import build_loader
    from pipeline.distributed import init_from_env, leave_process_group
    from pipeline.engine.trainer import build_engine, build_precision, seed_everything
    from pipeline.methods import build_method
    from pipeline.optim import build_schedule

    env = init_from_env(cfg.train.collective_timeout_s)
    device = env.device
    seed_everything(cfg.run.seed, False)
    loader = build_loader(
        cfg.data, split="train", rank=env.rank, world_size=env.world_size, seed=cfg.run.seed, device=device
    )
    global_batch_size = cfg.data.batch_size * env.world_size
    engine = build_engine(cfg, build_method(cfg), device, global_batch_size)
    total_steps = 2 * (args.steps + args.warmup)
    schedule = build_schedule(cfg.optim, total_steps, max(len(loader), 1), global_batch_size)
    precision = build_precision(cfg, device)
    channels_last = device.type == "cuda" and cfg.train.channels_last
    step_index = 0

    def step(batch: Batch) -> None:
        nonlocal step_index
        views = [v.to(device, non_blocking=True) for v in batch.views]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        labels = batch.labels.to(device, non_blocking=True) if batch.labels is not None else None
        schedule.apply(engine.optimizer, step_index)
        with precision:
            loss, _ = engine.forward(views, labels, sync=True)
        engine.backward(loss)
        engine.module.after_backward(step_index, total_steps)
        engine.step()
        engine.module.after_optimizer_step(step_index, total_steps)
        step_index += 1

    real = _forever(loader)
    first = next(real)
    synthetic_batch = Batch(
        views=[torch.randn_like(v, device=device) for v in first.views],
        labels=first.labels.to(device) if first.labels is not None else None,
    )

    def synthetic() -> Iterator[Batch]:
        while True:
            yield synthetic_batch

    engine.module.train()
    synthetic_s = _timed_steps(step, synthetic(), args.steps, args.warmup, device)
    pipeline_s = _timed_steps(step, real, args.steps, args.warmup, device)
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
        "synthetic_images_per_s": round(images / synthetic_s, 2),
        "pipeline_images_per_s": round(images / pipeline_s, 2),
        "ratio": round(synthetic_s / pipeline_s, 4),
    }
    if env.rank == 0:
        print(json.dumps(row), flush=True)
    leave_process_group(completed=True)
    return 0
