"""`python -m bench quality`: what a method learns in a fixed budget, as kNN top-1 on a labelled set.

Trains `--config` (+ overrides) with the real trainer on labelled shards, then classifies the held-out
shards by weighted kNN (k and temperature from `eval.k` / `eval.temperature`: 200 and 0.1, lightly's
protocol) against the training shards seen through the eval transform (`pipeline.eval.knn`, the code
`pipeline.eval knn` and the online monitor use). The same backbone at random init is the floor. Prints
one JSON line per seed, so a regression in what a method learns is caught the way a slowdown is;
`images_per_s` is end to end (training images over the trainer's wall time, startup and checkpoints in).

`--preset cpu` (the default) sizes the run for a CPU: the `tiny` ResNet with the standard stem, batch
256, 4 epochs, DALI in CPU mode, fp32. `--preset config` keeps the config's own settings: with
configs/cifar10_*.yaml that is lightly's CIFAR-10 protocol (ResNet-18, CIFAR stem, 200 epochs), for a GPU.
Overrides given after the options win over both.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import ConfigError, load

PRESETS = {
    "cpu": [
        "model.backbone=tiny",
        "model.cifar_stem=false",
        "data.backend=dali",
        "data.batch_size=256",
        "data.num_workers=2",
        "train.epochs=4",
        "train.precision=fp32",
    ],
    "config": [],
}

EXAMPLES = """examples:
  python -m data_prep shard ../shared/data/cifar10/train-00.tar /tmp/c10/train   # 10,000 images
  python -m data_prep shard ../shared/data/cifar10/test.tar /tmp/c10/test
  python -m bench quality --config configs/cifar10_mocov2.yaml \\
      --train-shards /tmp/c10/train --val-shards /tmp/c10/test --seed 0 --seed 1
  python -m bench quality --config configs/cifar10_byol.yaml --train-shards T --val-shards V train.epochs=8
  # lightly's full protocol on a GPU (ResNet-18, CIFAR stem, batch 512, 200 epochs):
  python -m bench quality --preset config --config configs/cifar10_mocov2.yaml \\
      --train-shards /data/c10/train --val-shards /data/c10/test
"""


def check_labelled(option: str, shards: str) -> None:
    """kNN needs labels on both sides: refuse shards without a manifest or without classes."""
    from data_prep.manifest import read_manifest

    try:
        classes = read_manifest(shards).get("classes")
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{option} {shards}: no readable manifest.json ({e}); shard it with python -m data_prep shard"
        ) from e
    if not classes:
        raise ConfigError(f"{option} {shards}: the shards have no labels; shard them with --labels auto")


def knn_top1(cfg, backbones: list[torch.nn.Module], device: torch.device) -> list[float]:
    """Weighted-kNN top-1 of the held-out shards against the training shards for each backbone, in one
    pass over the images (decoding them dominates on a CPU)."""
    from data_prep.manifest import read_manifest
    from pipeline.data import build_eval_loader
    from pipeline.eval.knn import knn_accuracy

    def features(shards: str, split: str | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        loader = build_eval_loader(
            shards, image_size=cfg.data.image_size, batch_size=256, split=split, device=device
        )
        feats: list[list[torch.Tensor]] = [[] for _ in backbones]
        labels = []
        with torch.no_grad():
            for images, y in loader:
                for out, net in zip(feats, backbones, strict=True):
                    out.append(net(images).float().cpu())  # (B, D)
                labels.append(y.cpu())
        return [torch.cat(f) for f in feats], torch.cat(labels)

    query_split = "val" if "val" in read_manifest(cfg.data.val_shards)["splits"] else None
    bank_x, bank_y = features(cfg.data.train_shards, "train")
    query_x, query_y = features(cfg.data.val_shards, query_split)
    num_classes = int(max(bank_y.max(), query_y.max())) + 1
    return [
        knn_accuracy(
            b, bank_y, q, query_y, num_classes=num_classes, k=cfg.eval.k, temperature=cfg.eval.temperature
        )["top1"]
        for b, q in zip(bank_x, query_x, strict=True)
    ]


def quality_run(config: str, overrides: list[str], seed: int, out_dir: Path) -> dict | None:
    """Train one seed into `out_dir`, then kNN-evaluate it and its random init on rank 0: its result row
    (None on the other ranks of a torchrun job)."""
    from pipeline.engine.trainer import train
    from pipeline.eval.features import load_backbone

    cfg = load(config, [*overrides, f"run.seed={seed}", f"run.output_dir={out_dir}"])
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    start = time.perf_counter()
    result = train(cfg)
    train_s = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) != 0:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nets = [load_backbone(str(out_dir)), load_backbone(str(out_dir), random_init=True, seed=seed)]
    trained, random = knn_top1(cfg, [b.module.to(device) for b in nets], device)
    global_batch_size = cfg.data.batch_size * cfg.train.grad_accum_steps * world_size
    return {
        "bench": "quality",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "method": cfg.method.name,
        "backbone": cfg.model.backbone,
        "backend": cfg.data.backend,
        "seed": seed,
        "epochs": cfg.train.epochs,
        "steps": result.step,
        "global_batch_size": global_batch_size,
        "knn_top1": round(trained, 4),
        "random_init_knn_top1": round(random, 4),
        "images_per_s": round(result.step * global_batch_size / train_s, 1),
        "train_s": round(train_s, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench quality", description=__doc__, epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--config", default="configs/cifar10_mocov2.yaml")
    parser.add_argument("--train-shards", required=True, help="labelled shards to train on (the kNN bank)")
    parser.add_argument("--val-shards", required=True, help="labelled held-out shards (the kNN queries)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--seed", type=int, action="append", help="repeat for several seeds (default: 0)")
    parser.add_argument(
        "--keep", metavar="DIR", help="keep each seed's run in DIR/seed-N (default: a temp dir)"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_args(argv)
    overrides = [
        *PRESETS[args.preset],
        f"data.train_shards={args.train_shards}",
        f"data.val_shards={args.val_shards}",
        "eval.every_epochs=0",
        "eval.embed_map=false",
        "checkpoint.keep_last=1",
        "checkpoint.resume=none",  # a reused --keep folder trains afresh instead of resuming a finished run
        "logging.progress_bar=false",
        "logging.wandb.mode=disabled",
        *args.overrides,
    ]
    try:
        if "WORLD_SIZE" in os.environ and not args.keep:
            raise ConfigError(
                "--keep DIR is needed under torchrun: every rank must write the same run folder"
            )
        load(args.config, overrides)  # every mistake in one line before any training
        for option, shards in (("--train-shards", args.train_shards), ("--val-shards", args.val_shards)):
            check_labelled(option, shards)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from pipeline.distributed import leave_process_group

    completed = False
    try:
        keep = contextlib.nullcontext(args.keep)  # no temp folder to leave behind when one is given
        with keep if args.keep else tempfile.TemporaryDirectory(prefix="bench-quality-") as folder:
            root = Path(folder)
            for seed in args.seed or [0]:
                row = quality_run(args.config, overrides, seed, root / f"seed-{seed}")
                if row is not None:
                    print(json.dumps(row), flush=True)
        completed = True
    finally:
        leave_process_group(completed=completed)
    return 0
