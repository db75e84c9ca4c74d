"""Plan, write and resume WebDataset shards.

The plan (which item goes into which shard under which key) is a pure function of the sorted source
listing and the options, so a re-run after an interruption computes the same plan, skips the shards
already published for it, and writes the rest byte-identically: tar members carry fixed mtime, owner
and mode. A shard is published in three atomic steps: its `.idx`, the tar (renamed from a temp name, or
uploaded in one PUT), then a small progress record; only the record makes a shard count as done.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import BinaryIO

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from data_prep.image import Rejected, check_image
from data_prep.index import format_index
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, join, write_atomic
from data_prep.parts import WHOLE, Part, PartLock, part_record_path, write_part_record
from data_prep.pool import run_parallel
from data_prep.progress import Progress
from data_prep.sources import Reader, SourceError, SourceSpec, StreamedListing, redact, stream_listing
from data_prep.tables import Columns
from data_prep.tarwriter import TarWriter

PROGRESS_DIR = ".data_prep-progress"
KEY_DIGITS = 8
TEMP_PATTERNS = ("*.tmp", "*.tmp-*")  # a shard being written, an index/record being renamed into place


class OutputError(Exception):
    """OUT cannot be written (unwritable, missing bucket, bad credentials): one line for the user."""


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


@dataclass(frozen=True, slots=True)
class Sample:
    key: str  # zero-padded running number within the split (and part)
    ref: str
    path: str
    label: int | None


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard; picklable for spawned processes."""

    spec: SourceSpec
    out: str
    split: str
    name: str  # "train-000000.tar", or "train-p0003-000000.tar" for part 3 of several
    index_name: str  # "train-000000.idx"
    samples: tuple[Sample, ...]
    resize_short: int | None
    plan_id: str
    staging: str  # local folder for temp files when OUT is remote


@dataclass(frozen=True)
class Summary:
    images: int  # samples in the finished dataset (this part's, for a part)
    written_now: int  # images processed by this run (less than `images` after a resume)
    shards: int
    rejected: int
    seconds: float
    out: str
    part: Part = WHOLE

    @property
    def images_per_s(self) -> float:
        return self.written_now / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        part = f" (part {self.part})" if self.part.count > 1 else ""
        return (
            f"data_prep shard: {self.images} images in {self.shards} shards -> {self.out}{part}; "
            f"{self.rejected} rejected; {self.written_now} processed in {self.seconds:.1f} s "
            f"({self.images_per_s:.0f} images/s)"
        )


@dataclass(frozen=True)
class Items:
    """This part's items, compact: 10 M refs take ~10 M x (length + 8) bytes, not a Python object each."""

    spec: SourceSpec
    refs: pa.ChunkedArray  # strings, in listing order
    labels: np.ndarray  # int32 class index per item; -1: unlabelled
    classes: list[str]
    listed: int  # items in the whole listing, every part's


def _class_list(seen: set, fixed: tuple[str, ...]) -> list[str]:
    """Classes from the labels seen: names sorted; integer labels 0..max; a datasets ClassLabel's names."""
    if fixed:
        return list(fixed)
    names = sorted(v for v in seen if isinstance(v, str))
    ints = sorted(v for v in seen if isinstance(v, int))
    if names and ints:
        raise SourceError(f"labels mix integers ({ints[0]}) and class names ({names[0]!r}); use one kind")
    if ints and ints[0] < 0:
        raise SourceError(f"negative label {ints[0]}: integer labels must be 0..K-1")
    return names or [str(i) for i in range(ints[-1] + 1 if ints else 0)]


def collect(listing: StreamedListing, part: Part) -> Items:
    """Every `part.count`-th item of the streamed listing from item `part.index`: the part's own items,
    found without holding the others; the class list comes from every item's label."""
    refs: list[pa.Array] = []
    labels: list[pa.Array] = []
    seen: set = set()
    listed = 0
    for batch_refs, batch_labels in listing.batches:
        first = (part.index - listed) % part.count
        take = pa.array(np.arange(first, len(batch_refs), part.count))
        refs.append(pc.cast(pa.array(batch_refs), pa.string()).take(take))
        if batch_labels is not None:
            values = pa.array(batch_labels) if isinstance(batch_labels, list) else batch_labels
            seen.update(v for v in pc.unique(values).to_pylist() if v is not None)
            labels.append(values.take(take))
        listed += len(batch_refs)
    all_refs = pa.chunked_array(refs, pa.string())  # chunks as read: concatenating would double the peak
    classes = _class_list(seen, listing.class_names)
    index = np.full(len(all_refs), -1, np.int32)
    if labels:
        values = pa.chunked_array(labels)
        if pa.types.is_integer(values.type):
            index = values.fill_null(-1).to_numpy().astype(np.int32)
        else:
            positions = pc.index_in(values, value_set=pa.array(classes, values.type))
            index = positions.fill_null(-1).to_numpy().astype(np.int32)
    return Items(listing.spec, all_refs, index, classes, listed)


@dataclass(frozen=True)
class Slot:
    split: str
    stem: str  # "train-p0003-000012"
    positions: np.ndarray  # indices into Items, in shard order
    first: int  # the first sample's running number within its split


@dataclass(frozen=True)
class Plan:
    items: Items
    slots: list[Slot]
    plan_id: str
    part: Part

    def task(self, slot: Slot, out: str, staging: str, resize_short: int | None) -> ShardTask:
        """The shard's samples, built only when it is about to be written."""
        refs = self.items.refs.take(pa.array(slot.positions)).to_pylist()
        labels = [None if v < 0 else v for v in self.items.labels[slot.positions].tolist()]
        prefix = f"p{self.part.index:04d}-" if self.part.count > 1 else ""
        samples = tuple(
            Sample(f"{prefix}{slot.first + j:0{KEY_DIGITS}d}", ref, self.items.spec.path_of(ref), label)
            for j, (ref, label) in enumerate(zip(refs, labels, strict=True))
        )
        return ShardTask(
            self.items.spec,
            out,
            slot.split,
            f"{slot.stem}.tar",
            f"{slot.stem}.idx",
            samples,
            resize_short,
            self.plan_id,
            staging,
        )


def _plan_id(items: Items, cfg: ShardConfig, part: Part) -> str:
    """Names what the plan is a function of. Refs are redacted: a presigned URL's signature changes with
    each signing, not the data."""
    digest = hashlib.sha256()
    options = {
        "format": FORMAT_VERSION,
        "spec": [items.spec.kind, redact(items.spec.url)],
        "classes": items.classes,
        "listed": items.listed,
        "part": [part.index, part.count],
        "samples_per_shard": cfg.samples_per_shard,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "resize_short": cfg.resize_short,
    }
    digest.update(json.dumps(options, sort_keys=True).encode())
    for start in range(0, len(items.refs), 65536):
        refs = items.refs.slice(start, 65536).to_pylist()
        digest.update("".join((redact(r) if "?" in r or "#" in r else r) + "\n" for r in refs).encode())
    digest.update(items.labels.tobytes())
    return digest.hexdigest()[:16]


def make_plan(items: Items, cfg: ShardConfig, part: Part = WHOLE) -> Plan:
    """The seeded shuffle of the part's items; the first `val_fraction` of the order is `val`. Rows of a
    table that holds the images keep their table order (a shuffle would read the table at random; the
    training loader shuffles), with a seeded random choice of rows held out for `val`."""
    n = len(items.refs)
    n_val = 0
    if cfg.val_fraction > 0 and n > 1:
        n_val = min(n - 1, max(1, round(n * cfg.val_fraction)))
    rng = np.random.default_rng(cfg.seed)
    if items.spec.kind == "table":
        val = np.sort(rng.choice(n, n_val, replace=False)) if n_val else np.empty(0, np.int64)
        keep = np.ones(n, bool)
        keep[val] = False
        train = np.flatnonzero(keep)
    else:
        order = rng.permutation(n)
        val, train = order[:n_val], order[n_val:]
    slots = []
    for split, positions in [("train", train), ("val", val)] if n_val else [("train", train)]:
        for i, start in enumerate(range(0, len(positions), cfg.samples_per_shard)):
            stem = f"{split}{part.tag}-{i:06d}"
            slots.append(Slot(split, stem, positions[start : start + cfg.samples_per_shard], start))
    return Plan(items, slots, _plan_id(items, cfg, part), part)


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
    # a name of this writer's own: another writer of the same shard (refused by the part lock, or not
    # locked out on a file system without flock) can never rename or delete this one's half-written tar
    tmp = os.path.join(root if local else task.staging, f"{task.name}.tmp-{uuid.uuid4().hex[:8]}")
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
        probe = join(root, f"{PROGRESS_DIR}/write-probe-{uuid.uuid4().hex[:8]}")  # parts probe at once
        write_atomic(fs, probe, b"")
        fs.rm_file(probe)
        return fs, root
    except Exception as e:
        line = f"cannot write output {out}: {type(e).__name__}: {e}".splitlines()[0]
        raise OutputError(redact(line)) from None


def _result_path(root: str, part: Part) -> str:
    """Where a finished run leaves its result: manifest.json, or the part's record for `merge`."""
    return join(root, MANIFEST_NAME) if part.count == 1 else part_record_path(root, part)


def _previous_result(fs: fsspec.AbstractFileSystem, root: str, plan: Plan) -> dict | None:
    """The result of a finished run of this same plan, if any. A stale one (another plan) is removed
    before any shard is rewritten, so OUT never looks complete while it changes."""
    path = _result_path(root, plan.part)
    if not fs.exists(path):
        return None
    result = json.loads(fs.cat_file(path))
    if result.get("plan") == plan.plan_id:
        return result
    fs.rm_file(path)
    if plan.part.count > 1 and fs.exists(join(root, MANIFEST_NAME)):
        fs.rm_file(join(root, MANIFEST_NAME))  # the merged manifest included the stale part
    return None


def _finished(fs: fsspec.AbstractFileSystem, root: str, plan: Plan) -> dict[str, dict]:
    """Progress records of shards an interrupted run of this plan already published (two listings,
    not a request per shard: OUT may be an object store)."""
    progress = join(root, PROGRESS_DIR)
    fs.invalidate_cache(root)  # decide from the store as it is now, not from a listing cached earlier
    recorded = {p.rsplit("/", 1)[-1] for p in fs.find(progress)}
    sizes = {p.rsplit("/", 1)[-1]: e["size"] for p, e in fs.find(root, maxdepth=1, detail=True).items()}
    done = {}
    for slot in plan.slots:
        name = f"{slot.stem}.tar"
        if f"{name}.json" not in recorded:
            continue
        record = json.loads(fs.cat_file(join(progress, f"{name}.json")))
        shard = record["shard"]
        published = shard["samples"] == 0 or (
            f"{slot.stem}.idx" in sizes and sizes.get(name) == shard["bytes"]
        )
        if record.get("plan") == plan.plan_id and published:
            done[name] = record
    return done


def _remove_temporaries(fs: fsspec.AbstractFileSystem, root: str, part: Part) -> None:
    """Temp files of this part's interrupted or killed runs (never part of a published shard); other
    parts' are theirs to remove."""
    if not isinstance(fs, LocalFileSystem):
        return
    prefix = f"*{part.tag}-*" if part.count > 1 else "*"
    for folder in (root, os.path.join(root, PROGRESS_DIR)):
        for pattern in TEMP_PATTERNS:
            for leftover in glob.glob(os.path.join(glob.escape(folder), prefix + pattern.lstrip("*"))):
                os.remove(leftover)


def _remove_records(fs: fsspec.AbstractFileSystem, root: str, plan: Plan) -> None:
    """A finished run's progress records: the whole folder for a run in one part, else only this
    part's (the other parts may still be running)."""
    progress = join(root, PROGRESS_DIR)
    if plan.part.count == 1:
        fs.rm(progress, recursive=True)
        return
    fs.invalidate_cache(progress)
    recorded = {p.rsplit("/", 1)[-1] for p in fs.find(progress)}
    mine = [join(progress, f"{s.stem}.tar.json") for s in plan.slots if f"{s.stem}.tar.json" in recorded]
    if mine:
        fs.rm(mine)


def shard(
    src: str,
    out: str,
    cfg: ShardConfig,
    part: Part = WHOLE,
    columns: Columns | None = None,
    progress_interval_s: float = 60.0,
    lock_wait_s: float = 0.0,
) -> Summary:
    """Shard `src` (this `part` of it) into `out`, resuming a previous run of the same plan. A run in one
    part writes manifest.json last; a part writes its record for `merge` last."""
    start = time.perf_counter()
    items = collect(stream_listing(src, cfg.labels, columns), part)
    if not items.listed:
        raise SourceError(f"no files found in source {redact(src)}")
    _check_not_own_output(src, out)
    fs, root = _prepare_output(out)
    with PartLock(fs, root, part, wait_s=lock_wait_s):
        plan = make_plan(items, cfg, part)
        previous = _previous_result(fs, root, plan)
        if previous is not None:  # nothing left to do
            n_shards = sum(len(s["shards"]) for s in previous["splits"].values())
            seconds = time.perf_counter() - start
            rejected = len(previous["rejected"])
            return Summary(previous["total_samples"], 0, n_shards, rejected, seconds, out, part)
        staging = tempfile.mkdtemp(prefix="data_prep-")
        try:
            records = _finished(fs, root, plan)
            todo = [slot for slot in plan.slots if f"{slot.stem}.tar" not in records]
            bar = Progress(
                "data_prep shard", sum(len(s.positions) for s in todo), "images", progress_interval_s
            )
            written_now = 0

            def on_done(task: ShardTask, record: dict) -> None:
                nonlocal written_now
                records[task.name] = record
                written_now += record["shard"]["samples"]
                bar.update(len(task.samples), len(record["rejected"]))

            tasks = (plan.task(slot, out, staging, cfg.resize_short) for slot in todo)
            try:
                run_parallel(write_shard, tasks, cfg.workers, on_done)
            finally:
                bar.close()
                for reader in _WORKER_READERS.values():  # the in-process run's (workers == 1)
                    reader.close()
                _WORKER_READERS.clear()
        except BaseException:  # interrupted, a worker died, OUT or SRC lost: finished shards stay
            _remove_temporaries(fs, root, part)
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        result = _result(src, cfg, plan, records)
        if part.count == 1:
            write_atomic(fs, join(root, MANIFEST_NAME), json.dumps(result, indent=1).encode())
        else:
            write_part_record(fs, root, part, result)
        _remove_temporaries(fs, root, part)  # also those of a run killed earlier (SIGKILL leaves them)
        _remove_records(fs, root, plan)
    n_shards = sum(len(s["shards"]) for s in result["splits"].values())
    seconds = time.perf_counter() - start
    return Summary(
        result["total_samples"], written_now, n_shards, len(result["rejected"]), seconds, out, part
    )


def _result(src: str, cfg: ShardConfig, plan: Plan, records: dict) -> dict:
    splits: dict[str, dict] = {}
    rejected = []
    for slot in plan.slots:
        record = records[f"{slot.stem}.tar"]
        body = splits.setdefault(slot.split, {"shards": [], "samples": 0})
        if record["shard"]["samples"]:
            body["shards"].append(record["shard"])
            body["samples"] += record["shard"]["samples"]
        rejected.extend(record["rejected"])
    result = {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": redact(src),
        "seed": cfg.seed,
        "plan": plan.plan_id,
        "options": {
            "samples_per_shard": cfg.samples_per_shard,
            "labels": cfg.labels,
            "resize_short": cfg.resize_short,
            "val_fraction": cfg.val_fraction,
        },
        "splits": splits,
        "classes": plan.items.classes,
        "total_samples": sum(s["samples"] for s in splits.values()),
        "rejected": rejected,
    }
    if plan.part.count > 1:
        result["part"] = {"index": plan.part.index, "count": plan.part.count}
    return result
