"""`python -m bench loader`: images/s and views/s of the CPU and DALI loaders on the same shards.

A slice of Imagenette (224 px JPEGs) and of CIFAR-10 (32 px) from the data folder is extracted and
sharded with `data_prep shard` into a cache folder once; each backend then runs the same recipe on
those shards. On a CUDA machine the DALI `mixed` (GPU decode + GPU augmentation) path runs as well.
One JSON object per line on stdout.

Examples:
  python -m bench loader                                   # small slice, both backends, 224 and 32 px
  python -m bench loader --limit 4096 --batches 50 --batch-size 256 --workers 16
  python -m bench loader --datasets imagenette --backends dali --recipe multicrop
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import time
from pathlib import Path

import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.data import DataConfig, build_loader

DATASETS = {  # name: (archive under the data root, image size)
    "imagenette": ("imagenette2-224/train-00.tar", 224),
    "cifar": ("cifar10/train-00.tar", 32),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def shards_for(name: str, data_root: Path, cache: Path, limit: int) -> Path:
    """The first `limit` images of the dataset's archive, sharded once into the cache."""
    out = cache / f"{name}-{limit}" / "shards"
    if (out / "manifest.json").exists():
        return out
    src = cache / f"{name}-{limit}" / "src"
    taken = 0
    with tarfile.open(data_root / DATASETS[name][0]) as archive:
        for member in archive:
            if taken == limit:
                break
            if member.isreg() and member.name.lower().endswith(IMAGE_SUFFIXES):
                archive.extract(member, src, filter="data")
                taken += 1
    class_root = next(p for p in src.iterdir() if p.is_dir())  # train/<class>/...
    argv = [
        "shard",
        str(class_root),
        str(out),
        "--samples-per-shard",
        str(max(1, limit // 8)),
        "--workers",
        "1",
    ]
    if data_prep_main(argv) != 0:
        raise RuntimeError(f"data_prep shard failed for {class_root}")
    return out


def measure(shards: Path, image_size: int, backend: str, device: torch.device, args) -> dict:
    cfg = DataConfig(
        train_shards=str(shards),
        backend=backend,
        batch_size=args.batch_size,
        num_workers=args.workers,
        recipe=args.recipe,
        image_size=image_size,
        local_image_size=max(8, image_size * 96 // 224),
    )
    loader = build_loader(cfg, device=device)
    batches = min(args.batches, len(loader) - 1)
    iterator = iter(loader)
    first = next(iterator)  # warm-up: worker start, pipeline build
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = batches * args.batch_size
    return {
        "bench": "loader",
        "backend": backend,
        "device": str(device),
        "image_size": image_size,
        "recipe": args.recipe,
        "views": len(first.views),
        "batch_size": args.batch_size,
        "batches": batches,
        "workers" if backend == "cpu" else "threads": args.workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "views_per_s": round(images * len(batch.views) / seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench loader",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("DATA_ROOT", "/work/shared/data")))
    p.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("BENCH_CACHE", "/tmp/bench-loader-cache"))
    )
    p.add_argument("--datasets", default="imagenette,cifar", help="comma list of: " + ", ".join(DATASETS))
    p.add_argument("--backends", default="cpu,dali", help="comma list of: cpu, dali")
    p.add_argument("--limit", type=int, default=512, help="images taken from each dataset (default: 512)")
    p.add_argument("--batches", type=int, default=4, help="timed batches after one warm-up batch")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (cpu) / DALI threads (dali)")
    p.add_argument("--recipe", default="simclr")
    args = p.parse_args(argv)

    print(
        json.dumps(
            {
                "bench": "loader",
                "cpu_count": os.cpu_count(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            }
        )
    )
    for name in args.datasets.split(","):
        shards = shards_for(name, args.data_root, args.cache, args.limit)
        runs = [(b, torch.device("cpu")) for b in args.backends.split(",")]
        if torch.cuda.is_available() and "dali" in args.backends.split(","):
            runs.append(("dali", torch.device("cuda")))  # the `mixed` decode + GPU augmentation path
        for backend, device in runs:
            row = measure(shards, DATASETS[name][1], backend, device, args)
            print(json.dumps({"dataset": name, **row}), flush=True)
    return 0
