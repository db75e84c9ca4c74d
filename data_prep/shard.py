"""Plan, write and resume WebDataset shards.

The plan (which item goes into which shard under which key) is a pure function of the sorted source
listing and the options, so a re-run after an interruption computes the same plan, skips the shards
already published for it, and writes the rest byte-identically: tar members carry fixed mtime, owner
and mode. A shard is published in three atomic steps: its `.idx`, the tar (renamed from a temp name, or
uploaded in one PUT), then a small progress record; only the record makes a shard count as done.
"""

from __future__ import annotations

import concurrent.futures as cf
import datetime
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from data_prep.image import Rejected, check_image
from data_prep.index import format_index
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, join, write_atomic, write_manifest
from data_prep.sources import Listing, Reader, SourceError, SourceSpec, list_source, redact
from data_prep.tarwriter import TarWriter

PROGRESS_DIR = ".data_prep-progress"
KEY_DIGITS = 8
TEMP_PATTERNS = ("*.tmp", "*.tmp-*")  # a shard being written, an index/record being renamed into place


class OutputError(Exception):
    """OUT cannot be written (unwritable, missing bucket, bad credentials): one line for the user."""


class WorkerDied(Exception):
    """A worker process died mid-run; finished shards are kept and a re-run resumes."""


@dataclass(frozen=True)
class ShardConfig:
    samples_per_shard: int = 1000
    workers: int = 1
    labels: str = "auto"  # "auto": class sub-folders (or a TAB column in a list) give labels; "none"
    resize_short: int | None = None  # re-encode images whose short side is larger than this
    val_fraction: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if self.labels not in ("auto", "none"):
            raise ValueError(f"--labels must be auto or none, got {self.labels!r}")
        if self.resize_short is not None and self.resize_short < 1:
            raise ValueError(f"--resize-short must be >= 1, got {self.resize_short}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class Sample:
    key: str  # zero-padded running number within the split
    ref: str
    path: str
    label: int | None


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard; picklable for spawned processes."""

    spec: SourceSpec
    out: str
    split: str
    name: str  # "train-000000.tar"
    index_name: str  # "train-000000.idx"
    samples: tuple[Sample, ...]
    resize_short: int | None
    plan_id: str
    staging: str  # local folder for temp files when OUT is remote


@dataclass(frozen=True)
class Summary:
    images: int  # samples in the finished dataset
    written_now: int  # images processed by this run (less than `images` after a resume)
    shards: int
    rejected: int
    seconds: float
    out: str

    @property
    def images_per_s(self) -> float:
        return self.written_now / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"data_prep shard: {self.images} images in {self.shards} shards -> {self.out}; "
            f"{self.rejected} rejected; {self.written_now} processed in {self.seconds:.1f} s "
            f"({self.images_per_s:.0f} images/s)"
        )


def plan(listing: Listing, cfg: ShardConfig) -> list[tuple[str, list[Sample]]]:
    """[(split, samples)] after the seeded shuffle; the first `val_fraction` of the order is `val`."""
    order = list(range(len(listing.items)))
    random.Random(cfg.seed).shuffle(order)
    n_val = 0
    if cfg.val_fraction > 0 and len(order) > 1:
        n_val = min(len(order) - 1, max(1, round(len(order) * cfg.val_fraction)))
    class_index = {name: i for i, name in enumerate(listing.classes)}
    splits = [("val", order[:n_val]), ("train", order[n_val:])] if n_val else [("train", order)]
    planned = []
    for split, positions in sorted(splits, key=lambda s: s[0] != "train"):
        samples = []
        for running, pos in enumerate(positions):
            item = listing.items[pos]
            label = class_index[item.label] if item.label is not None else None
            samples.append(Sample(f"{running:0{KEY_DIGITS}d}", item.ref, item.path, label))
        planned.append((split, samples))
    return planned


def make_tasks(listing: Listing, cfg: ShardConfig, out: str, staging: str) -> list[ShardTask]:
    chunks = []
    for split, samples in plan(listing, cfg):
        for i, start in enumerate(range(0, len(samples), cfg.samples_per_shard)):
            chunks.append((split, f"{split}-{i:06d}", tuple(samples[start : start + cfg.samples_per_shard])))
    fingerprint = {  # redacted: a presigned URL's signature changes with each signing, not the data
        "format": FORMAT_VERSION,
        "spec": [listing.spec.kind, redact(listing.spec.url)],
        "classes": listing.classes,
        "resize_short": cfg.resize_short,
        "shards": [
            [stem, [[s.key, redact(s.ref), s.path, s.label] for s in samples]] for _, stem, samples in chunks
        ],
    }
    plan_id = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]
    return [
        ShardTask(
            listing.spec,
            out,
            split,
            f"{stem}.tar",
            f"{stem}.idx",
            samples,
            cfg.resize_short,
            plan_id,
            staging,
        )
        for split, stem, samples in chunks
    ]


class _Hashing:
    """A write-only file that also feeds a running sha256, so the shard is hashed as it is written."""

    def __init__(self, f: BinaryIO, digest: hashlib._Hash):
        self.f, self.digest = f, digest

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.f.write(data)


_WORKER_READERS: dict[SourceSpec, Reader] = {}  # one per pool process, kept for its lifetime


def write_shard(task: ShardTask, reader: Reader | None = None) -> dict:
    """Read, check and pack one shard's images; publish tar + idx + progress record. Returns the
    shard's progress record: its manifest entry plus its `rejected` list."""
    if reader is None:
        reader = _WORKER_READERS.setdefault(task.spec, Reader(task.spec))
    payloads = reader.read_many([s.ref for s in task.samples])
    fs, root = url_to_fs(task.out)
    local = isinstance(fs, LocalFileSystem)
    tmp = os.path.join(root if local else task.staging, f"{task.name}.tmp")
    rejected: list[dict] = []
    index: list[list[tuple[str, int, int, str]]] = []  # per sample: (extension, data offset, size, name)
    digest = hashlib.sha256()
    with open(tmp, "wb") as f:
        tar = TarWriter(_Hashing(f, digest))
        for sample, data in zip(task.samples, payloads, strict=True):
            try:
                if isinstance(data, Exception):
                    raise Rejected(redact(f"unreadable: {type(data).__name__}: {data}"))
                image = check_image(data, task.resize_short)
            except Rejected as e:
                rejected.append({"path": sample.path, "reason": str(e)})
                continue
            meta = {"path": sample.path, "width": image.width, "height": image.height}
            meta["sha256"] = hashlib.sha256(image.data).hexdigest()
            members = [(image.extension, image.data)]
            if sample.label is not None:
                members.append(("cls", str(sample.label).encode()))
            members.append(("json", json.dumps(meta, sort_keys=True).encode()))
            index.append([])
            for extension, payload in members:
                name = f"{sample.key}.{extension}"
                index[-1].append((extension, tar.add(name, payload), len(payload), name))
        tar.close()
    entry = {"name": task.name, "index": task.index_name, "samples": len(index), "bytes": 0, "sha256": ""}
    record = {"plan": task.plan_id, "split": task.split, "shard": entry, "rejected": rejected}
    try:
        if not index:  # every image of this shard was rejected: publish nothing for it
            os.remove(tmp)
        else:
            entry.update(bytes=os.path.getsize(tmp), sha256=digest.hexdigest())
            index_text = format_index(index)
            shard_path, index_path = join(root, task.name), join(root, task.index_name)
            write_atomic(fs, index_path, index_text.encode())
            if local:
                os.replace(tmp, shard_path)
            else:
                fs.put_file(tmp, shard_path)
                os.remove(tmp)
        write_atomic(fs, join(root, f"{PROGRESS_DIR}/{task.name}.json"), json.dumps(record).encode())
    except Exception as e:  # OUT went away (a lost object store, a full disk): one line, resumable
        line = f"lost output {task.out} while writing {task.name}: {type(e).__name__}: {e}".splitlines()[0]
        raise OutputError(redact(line) + "; finished shards are kept, re-run to resume") from None
    return record


def _check_not_own_output(src: str, out: str) -> None:
    """Refuse SRC folders that hold OUT, or that are themselves a data_prep output: a second run would
    read the shards as images (losing their labels) and overwrite them."""
    src_fs, src_path = url_to_fs(src)
    out_fs, out_path = url_to_fs(out)
    if isinstance(src_fs, LocalFileSystem):
        src_path, out_path = os.path.realpath(src_path), os.path.realpath(out_path)
    src_path, out_path = src_path.rstrip("/"), out_path.rstrip("/")
    same_store = type(src_fs) is type(out_fs)
    if same_store and (out_path == src_path or out_path.startswith(src_path + "/")):
        raise SourceError(
            f"OUT {redact(out)} is inside SRC {redact(src)}: a re-run would read its own shards as images; "
            "choose an OUT outside SRC"
        )
    if src_fs.isdir(src_path) and any(
        src_fs.exists(join(src_path, name)) for name in (MANIFEST_NAME, PROGRESS_DIR)
    ):
        raise SourceError(
            f"SRC {redact(src)} is a data_prep output (it holds {MANIFEST_NAME} or {PROGRESS_DIR}); "
            "shard the original images, or use the shards as they are"
        )


def _prepare_output(out: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Create OUT and prove it is writable before any work starts."""
    try:
        fs, root = url_to_fs(out)
        root = root.rstrip("/") or "/"
        if isinstance(fs, LocalFileSystem):
            os.makedirs(os.path.join(root, PROGRESS_DIR), exist_ok=True)
        probe = join(root, f"{PROGRESS_DIR}/write-probe")
        write_atomic(fs, probe, b"")
        fs.rm_file(probe)
        return fs, root
    except Exception as e:
        line = f"cannot write output {out}: {type(e).__name__}: {e}".splitlines()[0]
        raise OutputError(redact(line)) from None


def _previous_manifest(fs: fsspec.AbstractFileSystem, root: str, plan_id: str) -> dict | None:
    """The manifest of a finished run of this same plan, if any. A stale manifest (another plan) is
    removed before any shard is rewritten, so OUT never looks complete while it changes."""
    path = join(root, MANIFEST_NAME)
    if not fs.exists(path):
        return None
    manifest = json.loads(fs.cat_file(path))
    if manifest.get("plan") == plan_id:
        return manifest
    fs.rm_file(path)
    return None


def _finished(fs: fsspec.AbstractFileSystem, root: str, tasks: list[ShardTask]) -> dict[str, dict]:
    """Progress records of shards an interrupted run of this plan already published (two listings,
    not a request per shard: OUT may be an object store)."""
    progress = join(root, PROGRESS_DIR)
    fs.invalidate_cache(root)  # decide from the store as it is now, not from a listing cached earlier
    recorded = {p.rsplit("/", 1)[-1] for p in fs.find(progress)}
    sizes = {p.rsplit("/", 1)[-1]: e["size"] for p, e in fs.find(root, maxdepth=1, detail=True).items()}
    done = {}
    for task in tasks:
        if f"{task.name}.json" not in recorded:
            continue
        record = json.loads(fs.cat_file(join(progress, f"{task.name}.json")))
        shard = record["shard"]
        published = shard["samples"] == 0 or (
            task.index_name in sizes and sizes.get(task.name) == shard["bytes"]
        )
        if record.get("plan") == task.plan_id and published:
            done[task.name] = record
    return done


class _AbandonedTasks(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Task exception was never retrieved")


def quiet_abandoned_tasks() -> None:
    """A store lost mid-request leaves aiohttp tasks behind; asyncio logs each one (a dozen lines of
    traceback) when it is collected, burying the one line that says what happened."""
    logging.getLogger("asyncio").addFilter(_AbandonedTasks())


def _worker_init(parent_pid: int) -> None:
    """Pool initializer: a worker must not outlive the run, even when the parent is SIGKILLed
    (Linux: PR_SET_PDEATHSIG; elsewhere the parent's own shutdown still ends its workers)."""
    quiet_abandoned_tasks()
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the line above took effect
        os._exit(1)


def _stop_workers() -> None:
    """Interrupted: end the pool's workers now instead of letting them finish their shards."""
    for process in multiprocessing.active_children():
        process.terminate()
    for process in multiprocessing.active_children():
        process.join(timeout=10)


def _remove_temporaries(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Temp files of an interrupted or killed run (never part of a published shard)."""
    if isinstance(fs, LocalFileSystem):
        for folder in (root, os.path.join(root, PROGRESS_DIR)):
            for pattern in TEMP_PATTERNS:
                for leftover in glob.glob(os.path.join(glob.escape(folder), pattern)):
                    os.remove(leftover)


def _run_tasks(tasks: list[ShardTask], workers: int, on_done: Callable[[ShardTask, dict], None]) -> None:
    if not tasks:
        return
    if workers == 1:
        reader = Reader(tasks[0].spec)
        try:
            for task in tasks:
                on_done(task, write_shard(task, reader))
        finally:
            reader.close()
        return
    # spawn, not fork: the parent may hold s3fs event-loop threads that a forked child would inherit
    ctx = multiprocessing.get_context("spawn")
    pool_args = {"mp_context": ctx, "initializer": _worker_init, "initargs": (os.getpid(),)}
    with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), **pool_args) as pool:
        futures = {pool.submit(write_shard, t): t for t in tasks}
        try:
            for future in cf.as_completed(futures):
                on_done(futures[future], future.result())
        except cf.process.BrokenProcessPool as e:
            raise WorkerDied(str(e)) from None
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            _stop_workers()
            raise


def shard(src: str, out: str, cfg: ShardConfig, progress: bool = False) -> Summary:
    """Shard `src` into `out` (resuming a previous run of the same plan); writes manifest.json last."""
    start = time.perf_counter()
    listing = list_source(src, cfg.labels)
    if not listing.items:
        raise SourceError(f"no files found in source {redact(src)}")
    _check_not_own_output(src, out)
    fs, root = _prepare_output(out)
    staging = tempfile.mkdtemp(prefix="data_prep-")
    try:
        tasks = make_tasks(listing, cfg, out, staging)
        previous = _previous_manifest(fs, root, tasks[0].plan_id)
        if previous is not None:  # nothing left to do
            n_shards = sum(len(s["shards"]) for s in previous["splits"].values())
            seconds = time.perf_counter() - start
            return Summary(previous["total_samples"], 0, n_shards, len(previous["rejected"]), seconds, out)
        records = _finished(fs, root, tasks)
        todo = [t for t in tasks if t.name not in records]
        written_now = 0
        with tqdm(total=sum(len(t.samples) for t in todo), unit="img", disable=not progress) as bar:

            def on_done(task: ShardTask, record: dict) -> None:
                nonlocal written_now
                records[task.name] = record
                written_now += record["shard"]["samples"]
                bar.update(len(task.samples))

            _run_tasks(todo, cfg.workers, on_done)
    except BaseException:  # interrupted, a worker died, OUT or SRC lost: finished shards stay
        _remove_temporaries(fs, root)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    manifest = _manifest(src, cfg, listing, tasks, records)
    write_manifest(out, manifest)
    _remove_temporaries(fs, root)  # also those of a run killed earlier (SIGKILL leaves them)
    fs.rm(join(root, PROGRESS_DIR), recursive=True)
    n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
    seconds = time.perf_counter() - start
    return Summary(manifest["total_samples"], written_now, n_shards, len(manifest["rejected"]), seconds, out)


def _manifest(src: str, cfg: ShardConfig, listing: Listing, tasks: list[ShardTask], records: dict) -> dict:
    splits: dict[str, dict] = {}
    rejected = []
    for task in tasks:
        record = records[task.name]
        body = splits.setdefault(task.split, {"shards": [], "samples": 0})
        if record["shard"]["samples"]:
            body["shards"].append(record["shard"])
            body["samples"] += record["shard"]["samples"]
        rejected.extend(record["rejected"])
    return {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": redact(src),
        "seed": cfg.seed,
        "plan": tasks[0].plan_id,
        "options": {
            "samples_per_shard": cfg.samples_per_shard,
            "labels": cfg.labels,
            "resize_short": cfg.resize_short,
            "val_fraction": cfg.val_fraction,
        },
        "splits": splits,
        "classes": listing.classes,
        "total_samples": sum(s["samples"] for s in splits.values()),
        "rejected": rejected,
    }
