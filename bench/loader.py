"""`python -m bench loader`: images/s and views/s of the loaders on the same shards, in one run.

A slice of Imagenette (224 px JPEGs) and of CIFAR-10 (32 px) from the data folder is extracted and
sharded with `data_prep shard` into a cache folder once; each backend then runs the same recipe on
those shards: `cpu` (torchvision in DataLoader workers), `dali` (CPU-only mode here; on a CUDA machine
also its `mixed` GPU-decode path), `torch` (batched augmentation on the device; `--torch-source`
resident and/or stream) and `kornia` (the torch backend's resident pixels, augmented by
kornia.augmentation instead of our ops, when kornia is importable). Each timed run is `--batches`
batches after `--warmup` untimed ones (worker start, pipeline build, first allocations); setup (the
resident decode) is reported apart. A last row per dataset gives the ratios between backends.
One JSON object per line on stdout.

Examples:
  python -m bench loader                                   # both datasets, every backend, 50 batches
  python -m bench loader --datasets cifar --backends cpu,dali,torch,kornia --batch-size 256
  python -m bench loader --batches 3 --warmup 1 --limit 256 # a quick check (CI)
  python -m bench loader --datasets imagenette --backends dali,torch --recipe multicrop
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from data_prep.__main__ import main as data_prep_main
from pipeline.data import DataConfig, build_loader

DATASETS = {  # name: (archive under the data root, image size)
    "imagenette": ("imagenette2-224/train-00.tar", 224),
    "cifar": ("cifar10/train-00.tar", 32),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
BACKENDS = ("cpu", "dali", "torch", "kornia")


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


def _forever(loader) -> Iterator:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def kornia_augment(loader):
    """The loader's views as kornia.augmentation pipelines, called like `BatchAugment` (uniform sizes)."""
    import kornia.augmentation as K

    def view(spec):
        ops = [
            K.RandomResizedCrop((spec.size, spec.size), scale=spec.scale, ratio=spec.ratio),
            K.RandomHorizontalFlip(p=spec.flip_p),
            K.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, p=spec.jitter_p),
            K.RandomGrayscale(p=spec.grayscale_p),
        ]
        if spec.blur_p > 0:
            kernel = (spec.blur_kernel, spec.blur_kernel)
            ops.append(K.RandomGaussianBlur(kernel, spec.blur_sigma, p=spec.blur_p))
        if spec.solarize_p > 0:
            t = spec.solarize_threshold
            ops.append(K.RandomSolarize(thresholds=(t, t), additions=(0.0, 0.0), p=spec.solarize_p))
        ops.append(K.Normalize(torch.tensor(spec.mean), torch.tensor(spec.std)))
        return K.AugmentationSequential(*ops).to(loader.device)

    views = [view(spec) for spec in loader.views]

    def augment(images, sizes, generator):
        pixels = images.float() / 255
        return [v(pixels) for v in views]

    return augment


def measure(shards: Path, image_size: int, backend: str, device: torch.device, source: str, args) -> dict:
    cfg = DataConfig(
        train_shards=str(shards),
        backend="torch" if backend == "kornia" else backend,
        batch_size=args.batch_size,
        num_workers=args.workers,
        recipe=args.recipe,
        image_size=image_size,
        local_image_size=max(8, image_size * 96 // 224),
        **({"source": source} if backend in ("torch", "kornia") else {}),
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    loader = build_loader(cfg, device=device)
    setup_s = time.perf_counter() - start
    if backend == "kornia":
        loader.augment = kornia_augment(loader)
    batches = _forever(loader)
    for _ in range(args.warmup):  # untimed: worker start, pipeline build, first allocations
        first = next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.batches):
        next(batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    images = args.batches * args.batch_size
    return {
        "bench": "loader",
        "backend": backend,
        **({"source": source} if backend in ("torch", "kornia") else {}),
        "device": str(device),
        "image_size": image_size,
        "recipe": args.recipe,
        "views": len(first.views),
        "batch_size": args.batch_size,
        "warmup_batches": args.warmup,
        "batches": args.batches,
        "workers" if backend != "dali" else "threads": args.workers,
        "torch_threads": torch.get_num_threads(),
        "setup_s": round(setup_s, 3),
        "seconds": round(seconds, 6),  # images_per_s derives from it; runs last tens of ms
        "images_per_s": round(images / seconds, 1),
        "views_per_s": round(images * len(first.views) / seconds, 1),
    }


def runs_for(args) -> list[tuple[str, torch.device, str]]:
    """(backend, device, torch source) in the order measured."""
    runs = []
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    devices = [torch.device(d) for d in (args.devices.split(",") if args.devices else available)]
    if unknown := [d.type for d in devices if d.type not in available]:
        raise SystemExit(f"--devices: {','.join(unknown)} not available here (have {','.join(available)})")
    for backend in args.backends.split(","):
        if backend not in BACKENDS:
            raise SystemExit(f"--backends: unknown {backend!r}, expected some of {','.join(BACKENDS)}")
        if backend == "kornia" and importlib.util.find_spec("kornia") is None:
            print(json.dumps({"bench": "loader", "skipped": "kornia", "why": "not importable"}), flush=True)
            continue
        sources = args.torch_source.split(",") if backend == "torch" else ["resident"]
        for device in devices:
            if backend == "cpu" and device.type == "cuda":
                continue  # the cpu backend's work is on the CPU whatever the device
            runs += [(backend, device, source) for source in sources]
    return runs


def ratios(rows: list[dict]) -> dict:
    """images/s of each measured run against the cpu and dali (CPU-only) runs of the same dataset."""
    rate = {
        f"{r['backend']}{'-' + r['source'] if 'source' in r else ''}@{r['device']}": r["images_per_s"]
        for r in rows
    }
    out = {}
    for base in ("cpu@cpu", "dali@cpu"):
        if base in rate:
            out.update({f"{k}/{base}": round(v / rate[base], 2) for k, v in rate.items() if k != base})
    return out


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
    p.add_argument("--backends", default=",".join(BACKENDS), help="comma list of: " + ", ".join(BACKENDS))
    p.add_argument("--devices", help="comma list of cpu, cuda (default: every one available)")
    p.add_argument(
        "--torch-source", default="resident,stream", help="torch backend: resident, stream or both"
    )
    p.add_argument("--limit", type=int, default=512, help="images taken from each dataset (default: 512)")
    p.add_argument(
        "--batches", type=int, default=50, help="timed batches (default: 50; fewer for a CI check)"
    )
    p.add_argument("--warmup", type=int, default=2, help="untimed batches before the timed ones")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers (cpu, torch) / DALI threads")
    p.add_argument("--recipe", default="simclr")
    args = p.parse_args(argv)
    if args.batches < 1 or args.warmup < 1:
        p.error("--batches and --warmup must be >= 1")

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
    runs = runs_for(args)
    for name in args.datasets.split(","):
        shards = shards_for(name, args.data_root, args.cache, args.limit)
        rows = []
        for backend, device, source in runs:
            row = {"dataset": name, **measure(shards, DATASETS[name][1], backend, device, source, args)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        print(json.dumps({"bench": "loader", "dataset": name, "ratios": ratios(rows)}), flush=True)
    return 0
