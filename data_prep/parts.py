"""Sharding on many machines: part I of N takes every N-th item of the streamed listing (from item I), so
each part derives its own plan with no coordinator and holds only its N-th of the listing; its shards are
named `train-p0003-000012.tar`, disjoint from every other part's. A finished part leaves a part record in
`.data_prep-parts/`; `merge` turns all N of them into one manifest.json, and refuses, naming the missing
parts, before they are all there.

A lock per part keeps two writers of the same part from interleaving: on a local (or shared POSIX) file
system an exclusive `flock`, released by the kernel when its holder dies; on an object store a lease
object created with a conditional PUT (If-None-Match: *), renewed while the part runs and taken over
only once it has not been renewed for LEASE_S seconds (a killed pod's retry waits that long at most).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_prep.manifest import FORMAT_VERSION, MANIFEST_NAME, join, write_atomic

PARTS_DIR = ".data_prep-parts"
LOCKS_DIR = ".data_prep-locks"
LEASE_S = 120.0


class PartBusy(Exception):
    """Another writer holds this part of OUT: one line naming it."""


class MergeError(Exception):
    """OUT's parts cannot be merged (missing, or from different runs): one line naming them."""


@dataclass(frozen=True)
class Part:
    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> Part:
        """`I/N`, 0 <= I < N (Kubernetes' JOB_COMPLETION_INDEX is 0-based)."""
        index, slash, count = text.partition("/")
        try:
            part = cls(int(index), int(count))
        except ValueError:
            raise ValueError(f"--part {text!r}: expected I/N, e.g. 3/16") from None
        if not slash or not 0 <= part.index < part.count:
            raise ValueError(f"--part {text!r}: expected I/N with 0 <= I < N")
        return part

    @property
    def tag(self) -> str:
        """In shard names: `train-p0003-000012.tar`; nothing for a run that is not split in parts."""
        return f"-p{self.index:04d}" if self.count > 1 else ""

    @property
    def name(self) -> str:
        return f"part-{self.index:04d}-of-{self.count:04d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Part()  # a run that is not split in parts


def _holder() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "token": uuid.uuid4().hex,
        "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"


class PartLock:
    """`with PartLock(fs, root, part):` holds the part for one writer, or raises PartBusy at once."""

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        root: str,
        part: Part,
        lease_s: float = LEASE_S,
        wait_s: float = 0.0,
    ):
        self.fs, self.part, self.lease_s, self.wait_s = fs, part, lease_s, wait_s
        self.path = join(root, f"{LOCKS_DIR}/{part.name}.lock")
        self.holder = _holder()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def __enter__(self) -> PartLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                if isinstance(self.fs, LocalFileSystem):
                    self._lock_local()
                else:
                    self._lock_store()
                return self
            except PartBusy:
                if time.monotonic() >= deadline:  # a retried pod waits out its dead predecessor's lease
                    raise
                time.sleep(min(5.0, self.wait_s / 10))

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)  # before unlocking: a waiter re-checks that it locked the live file
            os.close(self._fd)
            self._fd = None
        if self._renewer is not None:
            self._stop.set()
            self._renewer.join()
            with contextlib.suppress(Exception):  # a store lost mid-run: the lease then simply expires
                self.fs.rm_file(self.path)

    def _busy(self, holder: dict) -> PartBusy:
        return PartBusy(
            f"part {self.part} of this OUT is being written by {_describe(holder)}; run each part once "
            f"(a lock clears when its writer exits, on an object store {self.lease_s:.0f} s after it dies)"
        )

    def _lock_local(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                try:
                    holder = json.loads(os.read(fd, 4096) or b"{}")
                except ValueError:
                    holder = {}
                os.close(fd)
                raise self._busy(holder) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:  # not a file its previous holder removed while we waited to lock it
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self.holder).encode())
        self._fd = fd

    def _lease(self) -> bytes:
        return json.dumps({**self.holder, "renewed": time.time()}).encode()

    def _lock_store(self) -> None:
        for _ in range(2):
            try:
                self.fs.pipe_file(self.path, self._lease(), mode="create")
                break
            except (FileExistsError, OSError) as e:
                if not (isinstance(e, FileExistsError) or "PreconditionFailed" in str(e)):
                    raise
                try:
                    holder = json.loads(self.fs.cat_file(self.path))
                except FileNotFoundError:
                    continue  # released between our PUT and our read: try again
                if time.time() - holder.get("renewed", 0) < self.lease_s:
                    raise self._busy(holder) from None
                self.fs.rm_file(self.path)  # a dead writer's lease: take it over
        else:
            raise PartBusy(f"part {self.part}: another writer took this OUT's lease at the same time")
        self._renewer = threading.Thread(target=self._renew, name="data_prep-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            with contextlib.suppress(Exception):  # a missed renewal is retried; the lease has slack
                self.fs.pipe_file(self.path, self._lease())


def part_record_path(root: str, part: Part) -> str:
    return join(root, f"{PARTS_DIR}/{part.name}.json")


def write_part_record(fs: fsspec.AbstractFileSystem, root: str, part: Part, result: dict) -> None:
    if isinstance(fs, LocalFileSystem):
        os.makedirs(join(root, PARTS_DIR), exist_ok=True)
    write_atomic(fs, part_record_path(root, part), json.dumps(result, indent=1).encode())


def merge(fs: fsspec.AbstractFileSystem, root: str) -> dict:
    """manifest.json from every part record of OUT (written last, atomically); returns it."""
    records: dict[int, dict] = {}
    counts = set()
    folder = join(root, PARTS_DIR)
    fs.invalidate_cache(root)
    names = [p.rsplit("/", 1)[-1] for p in fs.find(folder)] if fs.exists(folder) else []
    for name in sorted(n for n in names if n.startswith("part-") and n.endswith(".json")):
        record = json.loads(fs.cat_file(join(folder, name)))
        records[record["part"]["index"]] = record
        counts.add(record["part"]["count"])
    if not records:
        raise MergeError(
            f"no finished parts in {join(root, PARTS_DIR)}; run `data_prep shard ... --part I/N` first"
        )
    if len(counts) > 1:
        raise MergeError(f"parts of different splits into {sorted(counts)} parts; shard into an empty OUT")
    (count,) = counts
    missing = [i for i in range(count) if i not in records]
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise MergeError(
            f"{len(missing)} of {count} parts not finished yet: {shown}; run them, then merge again"
        )
    first = records[0]
    for index, record in records.items():
        for key in ("source", "options", "classes", "seed"):
            if record[key] != first[key]:
                raise MergeError(f"part {index}/{count} was written with another {key} than part 0/{count}")
    splits: dict[str, dict] = {}
    for index in range(count):
        for split, body in records[index]["splits"].items():
            merged = splits.setdefault(split, {"shards": [], "samples": 0})
            merged["shards"] += body["shards"]
            merged["samples"] += body["samples"]
    manifest = {
        "format": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": first["source"],
        "seed": first["seed"],
        "plan": "+".join(records[i]["plan"] for i in range(count)),
        "parts": count,
        "options": first["options"],
        "splits": dict(sorted(splits.items(), key=lambda s: s[0] != "train")),
        "classes": first["classes"],
        "total_samples": sum(s["samples"] for s in splits.values()),
        "rejected": [r for i in range(count) for r in records[i]["rejected"]],
    }
    write_atomic(fs, join(root, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())
    return manifest
