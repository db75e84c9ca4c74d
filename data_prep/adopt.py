"""`data_prep index`: adopt WebDataset tars someone else wrote (webdataset's ShardWriter, img2dataset)
without copying a byte of them: a DALI `.idx` per tar, next to it or under `--out` when the source is
read-only, and a manifest whose entries point at the original tars. Members other than the image are
kept as they are (training ignores them); labels come from a member when asked (`cls`, or a field of
the `json` member). Resumable: a tar whose progress record matches its current size is not read again.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import posixpath
import time
from dataclasses import dataclass

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from data_prep.index import format_index, scan, split_name
from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, join, write_atomic, write_manifest
from data_prep.pool import run_parallel
from data_prep.progress import Progress
from data_prep.shard import PROGRESS_DIR, OutputError
from data_prep.shardspec import expand_shard_spec
from data_prep.sources import SourceError, redact

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # what training takes as the image, first one wins
READ_BLOCK = 64 << 20  # large sequential reads: a tar on an object store is read once, front to back


class LabelError(Exception):
    """A tar's labels do not fit the requested `--label-key`/`--classes`: one line naming tar and key."""


@dataclass(frozen=True)
class LabelKey:
    member: str  # "cls" or "json"
    field: str | None = None  # the JSON field, for member "json"

    @classmethod
    def parse(cls, text: str) -> LabelKey:
        if text == "cls":
            return cls("cls")
        member, _, field = text.partition(":")
        if member == "json" and field:
            return cls("json", field)
        raise ValueError(f"--label-key {text!r}: expected cls or json:FIELD (e.g. json:label)")

    def manifest(self) -> dict[str, str]:
        return {"member": "cls"} if self.member == "cls" else {"member": "json", "field": self.field}


@dataclass(frozen=True)
class IndexTask:
    url: str  # the tar, as the manifest will name it
    index_url: str
    bytes: int
    label_key: LabelKey | None
    record_url: str


@dataclass(frozen=True)
class IndexSummary:
    tars: int
    samples: int
    indexed_now: int  # tars read by this run (fewer than `tars` after a resume)
    seconds: float
    manifest: str

    def line(self) -> str:
        rate = self.samples / self.seconds if self.indexed_now and self.seconds > 0 else 0.0
        return (
            f"data_prep index: {self.samples} samples in {self.tars} tars -> {self.manifest}; "
            f"{self.indexed_now} tars read in {self.seconds:.1f} s ({rate:.0f} samples/s)"
        )


def _label_of(tar: str, key: str, kept: dict, label_key: LabelKey) -> int | str:
    raw = kept.get((key, label_key.member))
    if raw is None:
        raise LabelError(f"{tar}: sample {key} has no .{label_key.member} member; pick another --label-key")
    if label_key.member == "cls":
        text = raw.decode(errors="replace").strip()
        if not text.lstrip("-").isdigit():
            raise LabelError(
                f"{tar}: sample {key}'s .cls is {text!r}, not an integer; use --label-key json:FIELD"
            )
        return int(text)
    try:
        value = json.loads(raw)[label_key.field]
    except (ValueError, KeyError, TypeError):
        raise LabelError(
            f"{tar}: sample {key}'s .json has no field {label_key.field!r}; pick another --label-key"
        ) from None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise LabelError(
            f"{tar}: sample {key}'s {label_key.field!r} is {value!r}: need an int or a class name"
        )
    return value


def index_tar(task: IndexTask) -> dict:
    """Read one tar front to back, publish its `.idx`, then its progress record (which is returned)."""
    keep = frozenset({task.label_key.member}) if task.label_key else frozenset()
    try:
        fs, path = url_to_fs(task.url)
        with fs.open(path, "rb", block_size=READ_BLOCK, cache_type="readahead") as f:
            samples, kept = scan(f, keep)
    except Exception as e:
        raise SourceError(
            redact(f"cannot read tar {task.url}: {type(e).__name__}: {e}".splitlines()[0])
        ) from None
    labels: set[int | str] = set()
    for components in samples:
        key = split_name(components[0][3])[0]
        if not any(ext in IMAGE_EXTENSIONS for ext, *_ in components):
            members = sorted(ext for ext, *_ in components)
            raise LabelError(
                f"{task.url}: sample {key} has no image member (has {members}); training needs one"
            )
        if task.label_key:
            labels.add(_label_of(task.url, key, kept, task.label_key))
    if not samples:
        raise LabelError(f"{task.url}: no samples in this tar; leave it out of SHARDS")
    fs, _ = url_to_fs(task.index_url)  # the index may live elsewhere (--out)
    write_atomic(fs, fs._strip_protocol(task.index_url), format_index(samples).encode())
    entry = {"name": task.url, "index": task.index_url, "samples": len(samples), "bytes": task.bytes}
    label_key = task.label_key.manifest() if task.label_key else None
    record = {
        "shard": entry,
        "label_key": label_key,
        "labels": sorted(labels, key=lambda v: (isinstance(v, str), v)),
    }
    write_atomic(fs, fs._strip_protocol(task.record_url), json.dumps(record).encode())
    return record


def _sizes(urls: list[str]) -> dict[str, int]:
    """Each tar's size, from one listing per folder (not a request per tar); refuses missing tars."""
    sizes: dict[str, int] = {}
    folders: dict[str, list[str]] = {}
    for url in urls:
        folders.setdefault(posixpath.dirname(url), []).append(url)
    for folder, members in folders.items():
        try:
            fs, root = url_to_fs(folder)
            fs.invalidate_cache(root)
            listed = fs.find(root, maxdepth=1, detail=True) if fs.isdir(root) else {}
        except Exception as e:
            raise SourceError(
                redact(f"cannot list {folder}: {type(e).__name__}: {e}".splitlines()[0])
            ) from None
        local = isinstance(fs, LocalFileSystem)
        by_url = {(p if local else fs.unstrip_protocol(p)): info["size"] for p, info in listed.items()}
        missing = [u for u in members if u not in by_url]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise SourceError(f"tar not found: {redact(missing[0])}{more}; check SHARDS")
        sizes.update({u: by_url[u] for u in members})
    return sizes


def _manifest_folder(urls: list[str], out: str | None) -> str:
    if out is not None:
        return out.rstrip("/") if "://" in out else posixpath.abspath(out)
    folders = {posixpath.dirname(u) for u in urls}
    if len(folders) > 1:
        raise SourceError(
            f"SHARDS span {len(folders)} folders; pass --out DIR to say where the manifest and indexes go"
        )
    return folders.pop()


def _plan(
    urls: list[str], sizes: dict[str, int], folder: str, out: str | None, label_key: LabelKey | None
) -> list[IndexTask]:
    tasks, by_index = [], {}
    for url in urls:
        stem = posixpath.basename(url).removesuffix(".tar")
        index_url = join(folder, f"{stem}.idx") if out else url.removesuffix(".tar") + ".idx"
        if index_url in by_index:
            raise SourceError(
                f"{redact(url)} and {redact(by_index[index_url])} would share the index {redact(index_url)}; "
                "index them into different --out folders"
            )
        by_index[index_url] = url
        record_url = join(
            folder, f"{PROGRESS_DIR}/{stem}-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        )
        tasks.append(IndexTask(url, index_url, sizes[url], label_key, record_url))
    return tasks


def _prepare(folder: str, hint: str) -> fsspec.AbstractFileSystem:
    try:
        fs, root = url_to_fs(folder)
        if isinstance(fs, LocalFileSystem):
            fs.makedirs(join(root, PROGRESS_DIR), exist_ok=True)
        probe = join(root, f"{PROGRESS_DIR}/write-probe")
        write_atomic(fs, probe, b"")
        fs.rm_file(probe)
        return fs
    except Exception as e:
        line = f"cannot write {folder}: {type(e).__name__}: {e}".splitlines()[0]
        raise OutputError(redact(line) + hint) from None


def _classes(records: list[dict], label_key: LabelKey | None, classes: list[str] | None) -> list[str]:
    """The class list training maps labels with: given, the names seen (sorted), or 0..max for ints."""
    if label_key is None:
        return classes or []
    seen = {v for r in records for v in r["labels"]}
    names = sorted(v for v in seen if isinstance(v, str))
    ints = sorted(v for v in seen if isinstance(v, int))
    if names and ints:
        raise LabelError(f"labels mix integers ({ints[0]}) and class names ({names[0]!r}); give --classes")
    if classes is not None:
        unknown = [n for n in names if n not in classes] + [i for i in ints if not 0 <= i < len(classes)]
        if unknown:
            raise LabelError(f"label {unknown[0]!r} is not in --classes ({len(classes)} classes)")
        return classes
    if ints and ints[0] < 0:
        raise LabelError(f"negative label {ints[0]}; labels must be 0..K-1")
    return names or [str(i) for i in range(ints[-1] + 1 if ints else 0)]


def _finished(fs: fsspec.AbstractFileSystem, folder: str, tasks: list[IndexTask]) -> dict[str, dict]:
    """Records of tars an interrupted run indexed (one listing, not a request per tar) that still match
    the tar's size, its index's place and the label key."""
    progress = join(fs._strip_protocol(folder), PROGRESS_DIR)
    recorded = set(fs.find(progress)) if fs.exists(progress) else set()
    done = {}
    for task in tasks:
        path = fs._strip_protocol(task.record_url)
        if path not in recorded:
            continue
        record = json.loads(fs.cat_file(path))
        label_key = task.label_key.manifest() if task.label_key else None
        same = (record["shard"]["bytes"], record["shard"]["index"], record["label_key"])
        if same == (task.bytes, task.index_url, label_key):
            done[task.url] = record
    return done


def index_shards(
    shards: str,
    out: str | None = None,
    *,
    workers: int = 1,
    label_key: LabelKey | None = None,
    classes: list[str] | None = None,
    split: str = "train",
    progress_interval_s: float = 60.0,
) -> IndexSummary:
    """Index every tar `shards` names and write `manifest.json` (last, atomically) into `out`, or into the
    tars' own folder when `out` is None."""
    start = time.perf_counter()
    urls = expand_shard_spec(shards)
    sizes = _sizes(urls)
    folder = _manifest_folder(urls, out)
    tasks = _plan(urls, sizes, folder, out, label_key)
    fs = _prepare(folder, "" if out else "; the tars' folder is read-only? pass --out DIR")
    fs.invalidate_cache()
    records = _finished(fs, folder, tasks)
    todo = [t for t in tasks if t.url not in records]
    bar = Progress("data_prep index", len(todo), "tars", progress_interval_s)

    def on_done(task: IndexTask, record: dict) -> None:
        records[task.url] = record
        bar.update(1)

    try:
        run_parallel(index_tar, todo, workers, on_done)
    finally:
        bar.close()
    ordered = [records[t.url] for t in tasks]
    shards_out = [r["shard"] for r in ordered]
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": redact(shards) if isinstance(shards, str) else [redact(s) for s in shards],
        "splits": {split: {"shards": shards_out, "samples": sum(s["samples"] for s in shards_out)}},
        "classes": _classes(ordered, label_key, classes),
        "total_samples": sum(s["samples"] for s in shards_out),
        "rejected": [],
    }
    if label_key is not None:
        manifest["label"] = label_key.manifest()
    write_manifest(folder, manifest)
    fs.rm(join(fs._strip_protocol(folder), PROGRESS_DIR), recursive=True)
    seconds = time.perf_counter() - start
    return IndexSummary(
        len(tasks), manifest["total_samples"], len(todo), seconds, join(folder, MANIFEST_NAME)
    )
