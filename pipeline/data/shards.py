"""The shard set of one split: what the manifest says (shard URLs, sample counts, bytes, labels), and each
shard's DALI `.idx` index, parsed only when a reader reaches that shard.

Start-up reads one small file (the manifest; or one `.idx` header per tar when given tars without a
manifest), so it does not grow with the number of samples: a rank parses the indexes of the shards of its
own windows, when it reaches them (`windows`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

import data_prep.manifest
import data_prep.shardspec
import data_prep.sources
from pipeline.schema import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VERIFY_HINT = "run `python -m data_prep verify {root}` to find damaged shards"
MAX_OPEN_FILES = 16  # per reading process: shards (or staged ranges) of the windows in flight
TAR_TAIL = 512  # a tar member's header precedes its data offset by one block


class UnreadableShards(RuntimeError):
    """Shards that stopped being readable mid-run (a shard deleted, every sample in a row undecodable):
    the run stops in one line naming the shard, and resumes from its newest checkpoint once they are back."""

    @staticmethod
    def one_line(error: BaseException) -> str:
        """The original one-line message, also when a DataLoader worker re-raised it with its traceback."""
        last = str(error).strip().splitlines()[-1]
        return last.split(f"{UnreadableShards.__name__}: ", 1)[-1]


@dataclass(frozen=True)
class LabelSpec:
    """Where a sample's label is: the integer text of member `member` (data_prep's `.cls`), or `field` of
    a JSON member, an integer or a class name looked up in the manifest's `classes`."""

    member: str = "cls"
    field: str | None = None


@dataclass(frozen=True)
class ShardIndex:
    """One shard's `.idx`, as arrays: what readers need to locate each sample's bytes."""

    keys: tuple[str, ...]
    image: np.ndarray  # (n, 2) int64 data offset and size of the image member
    label: np.ndarray  # (n, 2) int64 offset and size of the label member, -1 when absent
    extent: np.ndarray  # (n, 2) int64 first and one-past-last byte of the sample's members, headers included


@dataclass(frozen=True)
class ShardSet:
    """All samples of one split; sample id = position in stored order (shard by shard)."""

    root: str  # the manifest's folder/URL, or the spec of the tars it was given
    split: str
    shard_urls: tuple[str, ...]
    index_urls: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    shard_bytes: tuple[int, ...]  # each tar's size in bytes (0 when unknown)
    classes: tuple[str, ...]
    label: LabelSpec | None  # None: unlabelled

    @property
    def num_samples(self) -> int:
        return int(self.starts[-1])

    @property
    def labelled(self) -> bool:
        return self.label is not None

    @property
    def starts(self) -> np.ndarray:
        """(S + 1,) int64: shard s holds sample ids [starts[s], starts[s + 1])."""
        return np.concatenate([[0], np.cumsum(self.shard_sizes, dtype=np.int64)])

    def is_remote(self, shard: int) -> bool:
        url = self.shard_urls[shard]
        return "://" in url and not url.startswith("file://")

    def local_path(self, shard: int) -> str:
        return self.shard_urls[shard].removeprefix("file://")

    def index(self, shard: int) -> ShardIndex:
        """Shard `shard`'s parsed `.idx` (read on each call: callers keep what they need)."""
        index = parse_index(self.index_urls[shard], self.label.member if self.label else "cls")
        if len(index.keys) != self.shard_sizes[shard]:
            raise ConfigError(
                f"{self.index_urls[shard]} lists {len(index.keys)} samples, the manifest of {self.root} "
                f"{self.shard_sizes[shard]}; re-index the shard (`python -m data_prep index`) or re-shard"
            )
        missing = np.flatnonzero(index.image[:, 0] < 0)
        if len(missing):
            raise ConfigError(
                f"{self.shard_urls[shard]}:{index.keys[missing[0]]} has no image member "
                f"(one of {', '.join(IMAGE_EXTS)})"
            )
        return index


def parse_index(url: str, label_member: str = "cls") -> ShardIndex:
    """DALI's wds2idx format: `v1.2 N` then per sample `ext offset size name ...` (v1.2) or
    `ext offset size ...` (older); offsets are of the members' data, one 512-byte header after their start."""
    with fsspec.open(url, "rt") as f:
        header = f.readline().split()
        lines = f.read().splitlines()
    if len(header) != 2 or not header[0].startswith("v"):
        raise ConfigError(f"{url} is not a DALI webdataset index (header {header})")
    if len(lines) != int(header[1]):
        raise ConfigError(f"{url} announces {header[1]} samples but lists {len(lines)}")
    step = 4 if header[0] >= "v1.2" else 3
    keys, image, label, extent = [], [], [], []
    for n, line in enumerate(lines):
        parts = line.split()
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), step)}
        keys.append(parts[3][: -(len(parts[0]) + 1)] if step == 4 else f"#{n}")  # member name minus .ext
        image.append(next((members[e] for e in IMAGE_EXTS if e in members), (-1, -1)))
        label.append(members.get(label_member, (-1, -1)))
        ends = [offset + -(-size // TAR_TAIL) * TAR_TAIL for offset, size in members.values()]
        extent.append((min(o for o, _ in members.values()) - TAR_TAIL, max(ends)))
    as_array = lambda rows: np.asarray(rows, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    return ShardIndex(tuple(keys), as_array(image), as_array(label), as_array(extent))


def read_manifest(root: str) -> dict:
    try:
        return data_prep.manifest.read_manifest(root)
    except FileNotFoundError as e:
        raise ConfigError(
            f"no manifest.json under {root}; write shards with `python -m data_prep shard`, or index "
            "existing WebDataset tars with `python -m data_prep index`"
        ) from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_shard_set(spec: str, split: str | None = "train") -> ShardSet:
    """The shard set `spec` names: a folder/URL holding manifest.json, several of them comma-separated
    (their `split`s concatenated), or WebDataset tars with their `.idx` beside them: one `.tar`, a brace
    pattern (`shards-{000000..000099}.tar`) or a comma-separated list. `split` None: the manifest's only
    split (tars given directly form one split, whatever its name)."""
    parts = [p.strip() for p in re.split(r",(?![^{]*\})", spec) if p.strip()]  # commas outside braces
    if not parts:
        raise ConfigError("a shard location is empty; name a folder/URL holding manifest.json or .tar files")
    if all(_is_tar_spec(p) for p in parts):
        return _tar_shard_set(spec, split or "train")
    if any(_is_tar_spec(p) for p in parts):
        raise ConfigError(f"{spec} mixes manifest folders and .tar files; give one kind")
    sets = [_manifest_shard_set(p, split) for p in parts]
    if len(sets) == 1:
        return sets[0]
    labelled = {s.label for s in sets}
    classes = {s.classes for s in sets}
    if len(labelled) > 1 or len(classes) > 1:
        raise ConfigError(
            f"{spec}: the folders' labels or class lists differ, so their splits cannot be joined"
        )
    return ShardSet(
        root=spec,
        split=sets[0].split,
        shard_urls=sum((s.shard_urls for s in sets), ()),
        index_urls=sum((s.index_urls for s in sets), ()),
        shard_sizes=sum((s.shard_sizes for s in sets), ()),
        shard_bytes=sum((s.shard_bytes for s in sets), ()),
        classes=sets[0].classes,
        label=sets[0].label,
    )


def split_names(spec: str) -> list[str]:
    """The splits `spec` holds (tars given directly: one, "train"); the first folder's when several."""
    first = spec.split(",")[0].strip()
    return ["train"] if _is_tar_spec(first) else sorted(read_manifest(first).get("splits", {}))


def _manifest_shard_set(root: str, split: str | None) -> ShardSet:
    manifest = read_manifest(root)
    splits = manifest.get("splits", {})
    if split is None:
        if len(splits) != 1:
            raise ConfigError(f"{root} holds splits {sorted(splits)}; name the one to read")
        split = next(iter(splits))
    if split not in splits:
        raise ConfigError(f"{root} has no split {split!r} (it has {sorted(splits)})")
    entries = splits[split]["shards"]
    if not entries:
        raise ConfigError(f"{root} split {split!r} has no shards")
    folder = data_prep.manifest.shard_folder(root)
    return ShardSet(
        root=root,
        split=split,
        shard_urls=tuple(_resolve(folder, e["name"]) for e in entries),
        index_urls=tuple(_resolve(folder, e["index"]) for e in entries),
        shard_sizes=tuple(int(e["samples"]) for e in entries),
        shard_bytes=tuple(int(e.get("bytes", 0)) for e in entries),
        classes=tuple(manifest.get("classes") or ()),
        label=_label_spec(manifest),
    )


def _label_spec(manifest: dict) -> LabelSpec | None:
    """A manifest's labels: its `label` entry, else `.cls` members when data_prep wrote labels."""
    if "label" in manifest:
        entry = manifest["label"]
        return None if entry is None else LabelSpec(entry.get("member", "cls"), entry.get("field"))
    options = manifest.get("options", {})
    return LabelSpec() if options.get("labels", "auto") != "none" and manifest.get("classes") else None


def _is_tar_spec(part: str) -> bool:
    return part.rstrip("/").endswith(".tar")


def _tar_shard_set(spec: str, split: str) -> ShardSet:
    """Tars named directly: counts from each `.idx` header (one small read per tar), no labels."""
    try:
        urls = data_prep.shardspec.expand_shard_spec(spec)
    except data_prep.sources.SourceError as e:
        raise ConfigError(str(e)) from e
    index_urls = [u.removesuffix(".tar") + ".idx" for u in urls]
    sizes = []
    for url, index_url in zip(urls, index_urls, strict=True):
        try:
            with fsspec.open(index_url, "rt") as f:
                header = f.readline().split()
        except FileNotFoundError as e:
            raise ConfigError(
                f"{url} has no index beside it ({index_url}); index the tars first: "
                f"`python -m data_prep index {spec} --out DIR`, then train on DIR"
            ) from e
        if len(header) != 2 or not header[0].startswith("v") or not header[1].isdigit():
            raise ConfigError(f"{index_url} is not a DALI webdataset index (header {header})")
        sizes.append(int(header[1]))
    fs, _ = fsspec.core.url_to_fs(urls[0])
    nbytes = [int(fs.size(u)) for u in urls] if len(urls) <= 64 else [0] * len(urls)  # a HEAD per tar
    return ShardSet(spec, split, tuple(urls), tuple(index_urls), tuple(sizes), tuple(nbytes), (), None)


def _resolve(folder: str, name: str) -> str:
    """A manifest entry: relative to the manifest's folder, or an absolute path or URL used as is."""
    if "://" in name or name.startswith("/"):
        return name
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else str(Path(folder) / name)


@dataclass(frozen=True)
class SampleRef:
    """One sample as a reader process gets it: where its bytes are on this machine (the shard itself, or
    the staged copy of a byte range of it starting at shard offset `base`), so workers never read indexes."""

    sample_id: int
    epoch: int
    path: str
    base: int
    image: tuple[int, int]  # offset in the shard and size of the image member
    label: tuple[int, int]  # the same for the label member; (-1, -1) when unlabelled
    where: str  # "shard-url:key", for messages

    def read(self, member: tuple[int, int], files: dict) -> bytes:
        """Member bytes through `files`, the reading process's cache of open handles."""
        handle = files.get(self.path)
        if handle is None:
            try:
                handle = open(self.path, "rb")  # noqa: SIM115 -- kept open in `files`, closed with it
            except FileNotFoundError as e:
                raise UnreadableShards(
                    f"{self.where.rsplit(':', 1)[0]} no longer exists; put it back and run the same command "
                    "again to resume from the newest checkpoint, or shard into a new folder"
                ) from e
            if len(files) >= MAX_OPEN_FILES:
                files.pop(next(iter(files))).close()
            files[self.path] = handle
        handle.seek(member[0] - self.base)
        data = handle.read(member[1])
        if len(data) != member[1]:
            raise OSError(f"short read: {len(data)} of {member[1]} bytes")
        return data


def read_label(data: bytes, spec: LabelSpec, classes: tuple[str, ...]) -> int:
    """A label member's bytes -> the class index."""
    if spec.field is None:
        return int(data.decode().strip())
    value = json.loads(data)[spec.field]
    if isinstance(value, int):
        return value
    try:
        return classes.index(str(value))
    except ValueError as e:
        raise ValueError(f"label {value!r} is not in the manifest's classes") from e
