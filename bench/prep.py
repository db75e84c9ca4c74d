"""`python -m bench prep`: sharding throughput. The same folder of real JPEGs is sharded by a plain
single-process `webdataset.ShardWriter` loop (bytes copied as-is, nothing checked), by that loop plus a
full PIL decode of every image (the check data_prep makes), and by `data_prep shard --workers W`
(decode check, sha256, `.idx`, manifest, atomic publish) timed end to end as a subprocess.
Each variant runs `--repeat` times and the fastest is reported (this machine is shared and noisy).
Prints one JSON object per line, the last one with the ratios."""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DATASETS = {"imagenette": "imagenette2-224", "cifar10": "cifar10"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def extract_slice(data_root: Path, dataset: str, images: int, cache: Path) -> Path:
    """The first `images` images of the dataset's train archives as `cache/<class>/<file>`; reused."""
    dest = cache / f"{dataset}-{images}"
    if (dest / ".complete").exists():
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    count = 0
    for archive in sorted((data_root / DATASETS[dataset]).glob("train-*.tar")):
        with tarfile.open(archive) as tar:
            for member in tar:
                if count == images:
                    break
                if not (member.isreg() and member.name.lower().endswith(IMAGE_SUFFIXES)):
                    continue
                target = dest / Path(member.name).parent.name / Path(member.name).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
                count += 1
    if count < images:
        raise SystemExit(f"bench prep: only {count} images found under {data_root / DATASETS[dataset]}")
    (dest / ".complete").touch()
    return dest


def list_images(src: Path) -> list[tuple[Path, int]]:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    return [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((src / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]


def shardwriter_loop(files: list[tuple[Path, int]], out: Path, samples_per_shard: int, decode: bool) -> float:
    """The baseline: one process, read -> (decode) -> ShardWriter. Returns seconds."""
    order = list(range(len(files)))
    random.Random(0).shuffle(order)
    start = time.perf_counter()
    with wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=samples_per_shard, verbose=0) as sink:
        for key, i in enumerate(order):
            path, label = files[i]
            data = path.read_bytes()
            if decode:
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
            sink.write({"__key__": f"{key:08d}", "jpg": data, "cls": label})
    return time.perf_counter() - start


def data_prep_run(src: Path, out: Path, samples_per_shard: int, workers: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "data_prep",
        "shard",
        str(src),
        str(out),
        "--labels",
        "auto",
        "--samples-per-shard",
        str(samples_per_shard),
        "--workers",
        str(workers),
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    default_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "contrastive-pipeline"
    parser = argparse.ArgumentParser(
        prog="python -m bench prep",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python -m bench prep --dataset cifar10 --images 4000",
    )
    parser.add_argument("--src", type=Path, help="a folder of class sub-folders of images (default: a slice)")
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="imagenette")
    parser.add_argument("--images", type=int, default=4000, help="size of the slice extracted from the data")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cache", type=Path, default=default_cache / "bench-prep")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs per variant; the fastest is reported")
    args = parser.parse_args(argv)

    src = args.src or extract_slice(args.data_root, args.dataset, args.images, args.cache)
    files = list_images(src)
    total_bytes = sum(path.stat().st_size for path, _ in files)  # also warms the page cache
    for path, _ in files:
        path.read_bytes()
    megabytes = round(total_bytes / 1e6, 1)
    common = {"bench": "prep", "src": str(src), "images": len(files), "megabytes": megabytes}
    rates = {}
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        per_shard = args.samples_per_shard
        runs = [
            ("webdataset.ShardWriter", 1, lambda out: shardwriter_loop(files, out, per_shard, False)),
            ("webdataset.ShardWriter+decode", 1, lambda out: shardwriter_loop(files, out, per_shard, True)),
            (
                "data_prep shard",
                args.workers,
                lambda out: data_prep_run(src, out, args.samples_per_shard, args.workers),
            ),
        ]
        for i, (name, workers, run) in enumerate(runs):
            times = []
            for r in range(args.repeat):
                out = Path(tmp) / f"{i}-{r}"
                out.mkdir()
                times.append(run(out))
                shutil.rmtree(out)
            rates[name] = len(files) / min(times)
            row = {
                "variant": name,
                "workers": workers,
                "seconds": round(min(times), 3),
                "seconds_all": [round(t, 3) for t in times],
                "images_per_s": round(rates[name], 1),
            }
            print(json.dumps(common | row), flush=True)
    ours = rates["data_prep shard"]
    print(
        json.dumps(
            common
            | {
                "metric": "ratio",
                "data_prep_over_shardwriter": round(ours / rates["webdataset.ShardWriter"], 3),
                "data_prep_over_shardwriter_decode": round(ours / rates["webdataset.ShardWriter+decode"], 3),
                "cpus": os.cpu_count(),
            }
        )
    )
    return 0
