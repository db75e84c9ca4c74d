"""`python -m bench stream`: what the training loaders fetch from object storage per epoch (issue 22).

Real shards (`data_prep shard`) are uploaded to a moto S3 server on loopback, reached through a proxy
that injects a per-request latency and counts GET requests and response bytes per object
(`bench/s3_loopback.py`); the loaders see only the standard endpoint variables. Datasets: `cifar`
(16,384 CIFAR-10 32 px JPEGs from the data folder, 64 shards of 256) and `large` (1,024 synthetic
noise JPEGs of ~98 KB, 64 shards of 16), so that at W = 64 every rank owns at least one shard;
`--quick`: `mini` (the embedded cifar10_mini sample, 8 shards of 250) at W = 1 and 4.

Three passes, one JSON object per line on stdout:
- `count`: for each backend and W, every rank's REAL loader (`build_loader(cfg, rank=r, world_size=W)`)
  is built and iterated for one epoch, rank after rank in this process (fsspec's filesystem cache
  cleared between ranks, so each starts cold like a new process), at `--count-latency-ms` (default 0:
  the counts do not depend on it). Per rank, the proxy's counts are taken when the epoch's last batch
  arrives. Reported: bytes fetched (all GETs: shards, indexes, manifest) against the bytes of the
  shards each rank read (summed over ranks, and the worst rank) and against the split's shard bytes,
  GET requests per sample delivered. Every rank is counted up to `--count-ranks` (default 8); above it,
  that many evenly spaced ranks (0 and W - 1 among them), and the split ratio scales their sum by
  W / ranks counted (a building rank forks its workers: 64 of them take too long on 2 cores).
- `timing`: rank 0's loader at each W, in a fresh subprocess, once reading s3:// through the proxy at
  `--latency-ms` and once reading the same shards from local files: images/s over `--timed-batches`
  batches after the first (into the next epochs when one epoch has fewer), the first batch's time,
  and memory of the rank: the process's RSS once torch and the backend are imported (`base_rss_mib`),
  its peak RSS (VmHWM; getrusage's maxrss keeps the forking parent's across exec), and the peak PSS
  of the process and its DataLoader workers together (sampled from /proc/PID/smaps_rollup every
  50 ms; PSS splits the pages forked workers share, where RSS would count them in each).
- `startup`: one rank (rank 0 of 64) in a fresh subprocess on a synthetic local manifest of 1 M and
  10 M samples (`--startup-sizes`): shards of 1,000 samples, every one a hard link to the same real
  1,000-sample tar and `.idx` (no images written per shard), so only the manifest and index names grow
  with N. Reported: loader construction, first batch (the first window), and peak memory.

Examples:
  python -m bench stream                                  # every pass, cpu/torch/dali, W = 1, 2, 8, 64
  python -m bench stream --quick                          # the CI size: mini, W = 1 and 4
  python -m bench stream --datasets cifar --backends cpu,torch --world-sizes 1,8 --latency-ms 20
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import s3fs
import torch
from PIL import Image

from bench.s3_loopback import S3Server, environment, start_s3_server
from data_prep.__main__ import main as data_prep_main
from pipeline.data import DataConfig, build_loader
from pipeline.data.loader import BACKENDS as BACKEND_CLASSES

REPO = Path(__file__).resolve().parent.parent
BACKENDS = ("cpu", "torch", "dali")
BUCKET = "bench-stream"
STARTUP_WORLD_SIZE = 64
STARTUP_SHARD_SAMPLES = 1000
MIB = 1 << 20


@dataclass(frozen=True)
class Dataset:
    shards: int
    samples_per_shard: int
    batch_size: int  # per rank: small enough that every rank has batches at W = 64


DATASETS = {
    "cifar": Dataset(shards=64, samples_per_shard=256, batch_size=16),
    "large": Dataset(shards=64, samples_per_shard=16, batch_size=4),
    "mini": Dataset(shards=8, samples_per_shard=250, batch_size=16),
}


def loader_config(shards: str, backend: str, batch_size: int, workers: int) -> dict:
    """DataConfig fields of every run: the simclr recipe's two views at 32 px (the bench is about
    reading, so augmentation is kept cheap), a 512-sample shuffle buffer (DALI's initial fill)."""
    return {
        "train_shards": shards,
        "backend": backend,
        "batch_size": batch_size,
        "num_workers": workers,
        "recipe": "simclr",
        "image_size": 32,
        "local_crops": 0,
        "shuffle_buffer": 512,
        **({"source": "stream"} if backend == "torch" else {}),
    }


# --- shards -------------------------------------------------------------------------------------------


def _shard(src: Path, out: Path, samples_per_shard: int) -> Path:
    argv = ["shard", str(src), str(out), "--samples-per-shard", str(samples_per_shard), "--workers", "1"]
    with contextlib.redirect_stdout(sys.stderr):  # its summary line is not one of this bench's rows
        code = data_prep_main(argv)
    if code != 0:
        raise RuntimeError(f"data_prep shard {src} {out} failed")
    return out


def _cifar_images(data_root: Path, count: int, dest: Path) -> None:
    """The first `count` images of CIFAR-10's train archives, class folders kept."""
    taken = 0
    for archive in sorted((data_root / "cifar10").glob("train-*.tar")):
        with tarfile.open(archive) as tar:
            for member in tar:
                if taken == count:
                    return
                if member.isreg() and member.name.lower().endswith(".jpg"):
                    tar.extract(member, dest, filter="data")
                    taken += 1
    raise RuntimeError(f"{data_root}/cifar10 holds {taken} train images, {count} needed")


def _noise_images(count: int, dest: Path, *, size: int, quality: int, classes: int = 4) -> None:
    """Synthetic JPEGs of uniform noise in `classes` folders (288 px at quality 95: ~98 KB each)."""
    rng = np.random.default_rng(0)
    for n in range(count):
        folder = dest / f"c{n % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{n:06d}.jpg", quality=quality)


def make_shards(name: str, data_root: Path, cache: Path) -> Path:
    """The dataset's shards in the cache (written once)."""
    out = cache / name / "shards"
    if (out / "manifest.json").exists():
        return out
    spec = DATASETS[name]
    count = spec.shards * spec.samples_per_shard
    src = cache / name / "src"
    shutil.rmtree(src, ignore_errors=True)
    if name == "mini":
        src = REPO / "sample_data" / "cifar10_mini" / "train"
    elif name == "cifar":
        _cifar_images(data_root, count, src)
        src = src / "train"
    else:
        _noise_images(count, src, size=288, quality=95)
    return _shard(src, out, spec.samples_per_shard)


def upload(server: S3Server, local: Path, name: str) -> str:
    """Copy a shard folder to the bucket, past the proxy (not counted); returns its s3:// URL."""
    server.make_bucket(BUCKET)
    fs = server.filesystem(direct=True)
    fs.put(f"{local}/", f"{BUCKET}/{name}/", recursive=True)
    return f"s3://{BUCKET}/{name}"


def split_shard_bytes(local: Path, split: str = "train") -> dict[str, int]:
    """Shard file name -> its size in bytes, from the manifest."""
    manifest = json.loads((local / "manifest.json").read_text())
    return {e["name"]: int(e["bytes"]) for e in manifest["splits"][split]["shards"]}


# --- count pass ---------------------------------------------------------------------------------------


def count_rank(server: S3Server, cfg: DataConfig, shard_bytes: dict[str, int], rank: int, world_size: int):
    """One rank's epoch: what it fetched and how many samples it delivered."""
    proxy = server.proxy
    proxy.wait_idle()
    proxy.reset()
    s3fs.S3FileSystem.clear_instance_cache()  # cold, as a new process: no cached listing or handle
    with tempfile.TemporaryDirectory(prefix="bench-stream-stage-", ignore_cleanup_errors=True) as stage:
        cfg = replace(cfg, stage_dir=stage)  # each rank its own staging folder, cold
        loader = build_loader(cfg, rank=rank, world_size=world_size, device="cpu")
        samples = 0
        for batch in loader:
            samples += batch.views[0].shape[0]
        traffic = proxy.traffic()  # at the epoch's end: later reads belong to the next epoch
        del loader
        gc.collect()
    gets = {path: t for (method, path), t in traffic.items() if method == "GET"}
    names = {path.rsplit("/", 1)[-1] for path in gets}
    return {
        "samples": samples,
        "get_requests": sum(t.requests for t in gets.values()),
        "head_requests": sum(t.requests for (method, _), t in traffic.items() if method == "HEAD"),
        "bytes_fetched": sum(t.body_bytes for t in gets.values()),
        "shard_bytes_fetched": sum(t.body_bytes for p, t in gets.items() if p.endswith(".tar")),
        "index_bytes_fetched": sum(t.body_bytes for p, t in gets.items() if p.endswith(".idx")),
        "shard_bytes_read": sum(size for name, size in shard_bytes.items() if name in names),
    }


def count_epoch(
    server: S3Server, cfg: DataConfig, shard_bytes: dict[str, int], world_size: int, ranks: list[int]
) -> dict:
    """The listed ranks' epochs, summed; ratios against the shards read and the split's shard bytes
    (when only some ranks are listed, their sum scaled to W ranks)."""
    per_rank = [count_rank(server, cfg, shard_bytes, r, world_size) for r in ranks]
    total = {key: sum(r[key] for r in per_rank) for key in per_rank[0]}
    split_bytes = sum(shard_bytes.values())
    return {
        "ranks": len(ranks),
        **total,
        "split_shard_bytes": split_bytes,
        "fetched_per_shard_byte_read": round(total["bytes_fetched"] / total["shard_bytes_read"], 4),
        "worst_rank_fetched_per_shard_byte_read": round(
            max(r["bytes_fetched"] / max(1, r["shard_bytes_read"]) for r in per_rank), 4
        ),
        "shard_bytes_fetched_per_shard_byte_read": round(
            total["shard_bytes_fetched"] / total["shard_bytes_read"], 4
        ),
        "fetched_per_split_byte": round(total["bytes_fetched"] * world_size / len(ranks) / split_bytes, 4),
        "gets_per_sample": round(total["get_requests"] / total["samples"], 5),
    }


# --- one rank in a subprocess (timing, start-up) --------------------------------------------------------


def _tree_pss_bytes(pid: int) -> int:
    """Proportional set size of `pid` and all its descendants, from /proc."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:")) * 1024
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended while being read
    return total


def _status_kib(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:"))


class PeakTreePss:
    """Samples this process tree's PSS every 50 ms until stopped; `.peak` in bytes."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_pss_bytes(os.getpid()))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run_rank(spec: dict) -> dict:
    """Build rank `spec['rank']`'s loader, take its first batch, then time up to `timed_batches` more."""
    cfg = DataConfig(**spec["cfg"], stage_dir=tempfile.mkdtemp(prefix="bench-stream-stage-"))
    BACKEND_CLASSES[cfg.backend]()  # imported before the clock starts: start-up is the loader's own
    base_rss_kib = _status_kib("VmRSS")
    sampler = PeakTreePss()
    start = time.perf_counter()
    loader = build_loader(cfg, rank=spec["rank"], world_size=spec["world_size"])
    construct_s = time.perf_counter() - start
    batches = (batch for _ in itertools.count() for batch in loader)  # epoch after epoch
    first = next(batches)
    first_batch_s = time.perf_counter() - start - construct_s
    images, start = 0, time.perf_counter()
    for batch in itertools.islice(batches, spec["timed_batches"]):
        images += batch.views[0].shape[0]
    seconds = time.perf_counter() - start
    del first, batches, loader
    shutil.rmtree(cfg.stage_dir, ignore_errors=True)
    return {
        "construct_s": round(construct_s, 3),
        "first_batch_s": round(first_batch_s, 3),
        "timed_images": images,
        "images_per_s": round(images / seconds, 1) if images else None,
        "base_rss_mib": round(base_rss_kib / 1024, 1),
        "peak_rss_mib": round(_status_kib("VmHWM") / 1024, 1),
        "peak_tree_pss_mib": round(sampler.stop() / MIB, 1),
    }


def run_rank_subprocess(spec: dict, env: dict[str, str], timeout_s: float) -> dict:
    """`run_rank` in a fresh interpreter (memory and caches of this rank alone)."""
    argv = [sys.executable, "-m", "bench", "stream", "--run-rank", json.dumps(spec)]
    try:
        done = subprocess.run(
            argv, env={**os.environ, **env}, cwd=REPO, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def timing(
    server: S3Server, shards: dict[str, str], backend: str, world_size: int, batch_size: int, args
) -> dict:
    """Rank 0 reading `shards['s3']` at `--latency-ms` against the same loader reading `shards['local']`."""
    rows = {}
    for source in ("s3", "local"):
        server.proxy.latency_s = args.latency_ms / 1000 if source == "s3" else 0.0
        cfg = loader_config(shards[source], backend, batch_size, args.workers)
        run = {"cfg": cfg, "rank": 0, "world_size": world_size, "timed_batches": args.timed_batches}
        rows[source] = run_rank_subprocess(run, server.env, args.timeout)
    server.proxy.latency_s = args.count_latency_ms / 1000
    s3_rate, local_rate = rows["s3"].get("images_per_s"), rows["local"].get("images_per_s")
    ratio = round(s3_rate / local_rate, 3) if s3_rate and local_rate else None
    return {"latency_ms": args.latency_ms, "s3": rows["s3"], "local": rows["local"], "s3_per_local": ratio}


# --- start-up on a synthetic manifest -----------------------------------------------------------------


def synthetic_manifest(samples: int, cache: Path) -> Path:
    """A shard folder of `samples` samples: one real 1,000-sample shard, hard-linked under every name."""
    out = cache / f"synthetic-{samples}"
    if (out / "manifest.json").exists():
        return out
    base = cache / "synthetic-base"
    if not (base / "shards" / "manifest.json").exists():
        _noise_images(STARTUP_SHARD_SAMPLES, base / "src", size=16, quality=90, classes=1)
        _shard(base / "src", base / "shards", STARTUP_SHARD_SAMPLES)
    manifest = json.loads((base / "shards" / "manifest.json").read_text())
    (entry,) = manifest["splits"]["train"]["shards"]
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    entries = []
    for n in range(-(-samples // STARTUP_SHARD_SAMPLES)):
        name = f"train-{n:06d}"
        for ext in ("tar", "idx"):
            os.link(base / "shards" / entry["name" if ext == "tar" else "index"], out / f"{name}.{ext}")
        entries.append({**entry, "name": f"{name}.tar", "index": f"{name}.idx"})
    manifest["splits"] = {"train": {"shards": entries}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def startup(samples: int, backend: str, args) -> dict:
    shards = synthetic_manifest(samples, args.cache)
    cfg = loader_config(str(shards), backend, DATASETS["cifar"].batch_size, args.workers)
    spec = {"cfg": cfg, "rank": 0, "world_size": STARTUP_WORLD_SIZE, "timed_batches": 0}
    row = run_rank_subprocess(spec, {}, args.startup_timeout)
    if "construct_s" in row:
        row["startup_s"] = round(row["construct_s"] + row["first_batch_s"], 3)
    return row


# --- command line -------------------------------------------------------------------------------------


def emit(row: dict) -> None:
    print(json.dumps({"bench": "stream", **row}), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench stream",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("DATA_ROOT", "/work/shared/data")))
    p.add_argument(
        "--cache", type=Path, default=Path(os.environ.get("BENCH_CACHE", "/tmp/bench-stream-cache"))
    )
    p.add_argument(
        "--datasets", help="comma list of cifar, large, mini (default: cifar,large; --quick: mini)"
    )
    p.add_argument("--backends", default="cpu,torch,dali", help="comma list of: " + ", ".join(BACKENDS))
    p.add_argument("--world-sizes", help="comma list (default: 1,2,8,64; --quick: 1,4)")
    p.add_argument("--latency-ms", type=float, default=20.0, help="per request, timing pass (default: 20)")
    p.add_argument("--count-latency-ms", type=float, default=0.0, help="per request, count pass (default: 0)")
    p.add_argument("--passes", default="count,timing,startup", help="comma list of count, timing, startup")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers / DALI threads per rank")
    p.add_argument("--count-ranks", type=int, default=8, help="ranks counted per W at most (default: 8)")
    p.add_argument(
        "--timed-batches", type=int, help="batches timed after the first (default: 32; --quick: 4)"
    )
    p.add_argument("--startup-sizes", help="samples (default: 1000000,10000000; --quick: 100000)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per timing subprocess")
    p.add_argument("--startup-timeout", type=float, default=600, help="seconds per start-up subprocess")
    p.add_argument("--quick", action="store_true", help="the CI size (see above)")
    p.add_argument("--run-rank", help=argparse.SUPPRESS)  # internal: one rank in a subprocess
    args = p.parse_args(argv)
    if args.run_rank:
        return args
    q = args.quick
    args.datasets = (args.datasets or ("mini" if q else "cifar,large")).split(",")
    args.backends = args.backends.split(",")
    args.passes = args.passes.split(",")
    try:
        args.world_sizes = [int(w) for w in (args.world_sizes or ("1,4" if q else "1,2,8,64")).split(",")]
        sizes = args.startup_sizes or ("100000" if q else "1000000,10000000")
        args.startup_sizes = [int(n) for n in sizes.split(",")]
    except ValueError as e:
        p.error(f"--world-sizes and --startup-sizes take comma lists of integers ({e})")
    args.timed_batches = args.timed_batches or (4 if q else 32)
    for option, given, allowed in (
        ("--datasets", args.datasets, DATASETS),
        ("--backends", args.backends, BACKENDS),
        ("--passes", args.passes, ("count", "timing", "startup")),
    ):
        if unknown := [v for v in given if v not in allowed]:
            p.error(f"{option}: unknown {','.join(unknown)}; expected some of {','.join(allowed)}")
    if min(args.world_sizes) < 1 or min(args.startup_sizes) < 1 or args.timed_batches < 1:
        p.error("--world-sizes, --startup-sizes and --timed-batches must be >= 1")
    if args.count_ranks < 2:
        p.error("--count-ranks must be >= 2 (the first and the last rank)")
    if not (args.data_root / "cifar10").is_dir() and "cifar" in args.datasets:
        p.error(f"--data-root {args.data_root} has no cifar10/ folder; point it at the shared data folder")
    return args


def counted_ranks(world_size: int, most: int) -> list[int]:
    """Every rank, or `most` evenly spaced ones (the first and last included)."""
    if world_size <= most:
        return list(range(world_size))
    return sorted({round(n * (world_size - 1) / (most - 1)) for n in range(most)})


def measure(server: S3Server, name: str, shards: dict[str, str], backend: str, world_size: int, args) -> None:
    """The count and timing rows of one dataset, backend and world size."""
    batch_size = DATASETS[name].batch_size
    row = {"dataset": name, "backend": backend, "world_size": world_size}
    if "count" in args.passes:
        cfg = DataConfig(**loader_config(shards["s3"], backend, batch_size, args.workers))
        shard_bytes = split_shard_bytes(Path(shards["local"]))
        counts = count_epoch(
            server, cfg, shard_bytes, world_size, counted_ranks(world_size, args.count_ranks)
        )
        emit({"pass": "count", **row, **counts})
    if "timing" in args.passes:
        emit({"pass": "timing", **row, **timing(server, shards, backend, world_size, batch_size, args)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run_rank:
        print(json.dumps(run_rank(json.loads(args.run_rank))), flush=True)
        return 0
    emit({"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "workers": args.workers})
    server = start_s3_server(proxy=True, latency_s=args.count_latency_ms / 1000)
    try:
        with environment(server):
            for name in args.datasets:
                local = make_shards(name, args.data_root, args.cache)
                shards = {"s3": upload(server, local, name), "local": str(local)}
                for backend in args.backends:
                    for world_size in args.world_sizes:
                        measure(server, name, shards, backend, world_size, args)
        if "startup" in args.passes:
            for samples in args.startup_sizes:
                for backend in args.backends:
                    row = {"samples": samples, "world_size": STARTUP_WORLD_SIZE, "backend": backend}
                    emit({"pass": "startup", **row, **startup(samples, backend, args)})
    finally:
        server.stop()
    return 0
