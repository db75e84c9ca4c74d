"""`python -m bench prep`: data_prep's throughput and memory, one JSON object per line.

- `shard` rows: the same folder of real JPEGs is sharded by a plain single-process
  `webdataset.ShardWriter` loop (bytes copied as-is, nothing checked), by that loop plus a full PIL
  decode of every image (the check data_prep makes), and by `data_prep shard --workers W` (decode
  check, sha256, `.idx`, manifest, atomic publish) timed end to end as a subprocess. Each variant runs
  `--repeat` times and the fastest is reported (this machine is shared and noisy); the last row has the
  ratios.
- `index` rows: `data_prep index` over synthetic tars in img2dataset's layout (key.jpg, key.txt,
  key.json), timed end to end as a subprocess with 1 and W workers: samples/s per worker, and proof that
  no tar byte changed (sha256 before and after).
- `plan` row: the peak memory (ru_maxrss) of a process that plans one part of `--parts` over a
  synthetic parquet listing of `--plan-items` items per part (S3 Inventory-like URLs with a label).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import webdataset as wds
from PIL import Image

from data_prep.tarwriter import TarWriter

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


def write_synthetic_tars(folder: Path, samples: int, per_tar: int, image_bytes: int) -> list[Path]:
    """img2dataset's layout with random bytes for the image (index never decodes it); written with
    data_prep's own deterministic tar writer, which is much faster than ShardWriter at a million samples."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    payload = rng.bytes(image_bytes)
    paths = []
    for t, start in enumerate(range(0, samples, per_tar)):
        path = folder / f"{t:06d}.tar"
        with open(path, "wb") as f:
            tar = TarWriter(f)
            for n in range(start, min(start + per_tar, samples)):
                key = f"{n:09d}"
                tar.add(f"{key}.jpg", payload)
                tar.add(f"{key}.txt", f"caption {n}".encode())
                tar.add(f"{key}.json", json.dumps({"key": key, "label": n % 1000}).encode())
            tar.close()
        paths.append(path)
    return paths


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def index_rows(args: argparse.Namespace, tmp: Path) -> None:
    tars = write_synthetic_tars(tmp / "wds", args.index_samples, args.index_per_tar, args.index_image_bytes)
    before = {p.name: _sha256(p) for p in tars}
    common = {"bench": "prep", "variant": "data_prep index", "samples": args.index_samples, "tars": len(tars)}
    common["gigabytes"] = round(sum(p.stat().st_size for p in tars) / 1e9, 2)
    for workers in sorted({1, args.workers}):
        times, in_run, cpu_s = [], [], []
        for r in range(args.repeat):
            out = tmp / f"index-{workers}-{r}"
            cmd = [sys.executable, "-m", "data_prep", "index", str(tmp / "wds"), "--out", str(out)]
            cmd += ["--workers", str(workers), "--label-key", "json:label"]
            start, cpu = time.perf_counter(), _children_cpu_s()
            done = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
            times.append(time.perf_counter() - start)
            cpu_s.append(_children_cpu_s() - cpu)
            in_run.append(float(done.stdout.rsplit(" in ", 1)[1].split(" s ")[0]))  # "read in 12.3 s (..."
            shutil.rmtree(out)
        rate = args.index_samples / min(in_run)
        untouched = {p.name: _sha256(p) for p in tars} == before
        row = {
            "workers": workers,
            "seconds": round(min(in_run), 2),
            "seconds_end_to_end": round(min(times), 2),
        }
        row |= {"samples_per_s": round(rate), "samples_per_s_per_worker": round(rate / workers)}
        # on a shared machine wall time is not this process's alone: samples per CPU-second (user + sys,
        # interpreter start-up and imports included) is what one dedicated core would do
        row["samples_per_cpu_s"] = round(args.index_samples / min(cpu_s))
        print(json.dumps(common | row | {"tars_untouched": untouched, "cpus": os.cpu_count()}), flush=True)


PLAN_PROBE = """
import json, sys, time
from data_prep.parts import Part
from data_prep.shard import ShardConfig, collect, make_plan
from data_prep.sources import stream_listing

def status_mib(field):  # VmHWM: this process's peak RSS (ru_maxrss can carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return round(int(line.split()[1]) / 1024)

base, start, part = status_mib("VmRSS"), time.perf_counter(), Part(0, int(sys.argv[2]))
items = collect(stream_listing(sys.argv[1], "auto"), part)
plan = make_plan(items, ShardConfig(samples_per_shard=1000), part)
row = {"items": len(items.refs), "listed": items.listed, "shards": len(plan.slots)}
row |= {"seconds": round(time.perf_counter() - start, 1), "peak_mib": status_mib("VmHWM")}
row["imports_mib"] = base
print(json.dumps(row))
"""


def plan_row(args: argparse.Namespace, tmp: Path) -> None:
    listing = tmp / "inventory.parquet"
    total = args.plan_items * args.parts
    schema = pa.schema([("url", pa.string()), ("label", pa.int32())])
    with pq.ParquetWriter(listing, schema) as writer:
        for start in range(0, total, 1_000_000):
            n = np.arange(start, min(start + 1_000_000, total))
            urls = pa.array([f"s3://bucket/images/{i % 1000:03d}/{i:010d}.jpg" for i in n.tolist()])
            writer.write_table(
                pa.table({"url": urls, "label": pa.array(n % 1000, pa.int32())}, schema=schema)
            )
    probe = [sys.executable, "-c", PLAN_PROBE, str(listing), str(args.parts)]
    done = subprocess.run(probe, cwd=REPO, check=True, capture_output=True, text=True)
    row = {"bench": "prep", "variant": "plan one part", "parts": args.parts} | json.loads(done.stdout)
    print(json.dumps(row | {"listing_megabytes": round(listing.stat().st_size / 1e6, 1)}), flush=True)


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
    parser.add_argument("--rows", default="shard,index,plan", help="which rows: shard, index, plan")
    parser.add_argument("--index-samples", type=int, default=1_000_000, help="samples in the synthetic tars")
    parser.add_argument("--index-per-tar", type=int, default=10_000, help="samples per synthetic tar")
    parser.add_argument("--index-image-bytes", type=int, default=2048, help="size of each synthetic image")
    parser.add_argument("--plan-items", type=int, default=10_000_000, help="listed items per part")
    parser.add_argument("--parts", type=int, default=2, help="parts the synthetic listing is split into")
    args = parser.parse_args(argv)
    rows = set(args.rows.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-prep-") as tmp:
        if "index" in rows:
            index_rows(args, Path(tmp))
        if "plan" in rows:
            plan_row(args, Path(tmp))
    if "shard" in rows:
        shard_rows(args)
    return 0


def shard_rows(args: argparse.Namespace) -> None:

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
