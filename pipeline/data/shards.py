"""The shard set of one split: manifest, DALI `.idx` indexes, and random access to one sample's bytes.

Readers get byte offsets from the `.idx` files that `data_prep shard` writes next to each tar, so any
sample can be read with one seek + read (local file or an fsspec range request on s3://). That random
access is what makes epoch-seeded order, disjoint rank slices and exact mid-epoch resume cheap.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import fsspec
import numpy as np

import data_prep.manifest
from pipeline.schema import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
REMOTE_BLOCK_BYTES = 4 << 20
VERIFY_HINT = "run `python -m data_prep verify {root}` to find damaged shards"


class UnreadableShards(RuntimeError):
    """Shards that stopped being readable mid-run (a shard deleted, every sample in a row undecodable):
    the run stops in one line naming the shard, and resumes from its newest checkpoint once they are back."""

    @staticmethod
    def one_line(error: BaseException) -> str:
        """The original one-line message, also when a DataLoader worker re-raised it with its traceback."""
        last = str(error).strip().splitlines()[-1]
        return last.split(f"{UnreadableShards.__name__}: ", 1)[-1]


@dataclass(frozen=True)
class ShardSet:
    """All samples of one split, in stored order (sample id = position in this order)."""

    root: str  # folder/URL holding manifest.json
    split: str
    shard_urls: tuple[str, ...]
    index_urls: tuple[str, ...]
    shard_sizes: tuple[int, ...]
    classes: tuple[str, ...]
    shard_of: np.ndarray  # (N,) int32 shard position of each sample
    keys: tuple[str, ...]  # (N,) sample keys
    image: np.ndarray  # (N, 2) int64 byte offset and size of the image member
    cls_member: np.ndarray  # (N, 2) int64 offset and size of the .cls member, -1 when absent

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def labelled(self) -> bool:
        return bool(len(self.cls_member)) and bool((self.cls_member[:, 0] >= 0).all())

    def locate(self, sample_id: int) -> str:
        """'shard.tar:key', for messages about one sample."""
        return f"{self.shard_urls[self.shard_of[sample_id]]}:{self.keys[sample_id]}"


def read_manifest(root: str) -> dict:
    try:
        return data_prep.manifest.read_manifest(root)
    except FileNotFoundError as e:
        raise ConfigError(
            f"no manifest.json under {root}; write shards with `python -m data_prep shard`"
        ) from e
    except ValueError as e:
        raise ConfigError(str(e)) from e


def load_shard_set(root: str, split: str | None = "train") -> ShardSet:
    """Read the manifest and every `.idx` of `split` (None: the manifest's only split)."""
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
    shard_urls = tuple(_join(root, e["name"]) for e in entries)
    index_urls = tuple(_join(root, e["index"]) for e in entries)
    shard_of, keys, image, cls_member = [], [], [], []
    sizes = []
    for pos, url in enumerate(index_urls):
        rows = parse_index(url)
        sizes.append(len(rows))
        for key, members in rows:
            ext = next((e for e in IMAGE_EXTS if e in members), None)
            if ext is None:
                raise ConfigError(f"{shard_urls[pos]}:{key} has no image member ({sorted(members)})")
            shard_of.append(pos)
            keys.append(key)
            image.append(members[ext])
            cls_member.append(members.get("cls", (-1, -1)))
    return ShardSet(
        root=root,
        split=split,
        shard_urls=shard_urls,
        index_urls=index_urls,
        shard_sizes=tuple(sizes),
        classes=tuple(manifest.get("classes", ())),
        shard_of=np.asarray(shard_of, dtype=np.int32),
        keys=tuple(keys),
        image=np.asarray(image, dtype=np.int64).reshape(-1, 2),
        cls_member=np.asarray(cls_member, dtype=np.int64).reshape(-1, 2),
    )


def parse_index(url: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """DALI's wds2idx format: `v1.2 N` then per sample `ext offset size name ...` (v1.2) or
    `ext offset size ...` (older) -> [(key, {ext: (offset, size)})]."""
    with fsspec.open(url, "rt") as f:
        header = f.readline().split()
        lines = f.read().splitlines()
    if len(header) != 2 or not header[0].startswith("v"):
        raise ConfigError(f"{url} is not a DALI webdataset index (header {header})")
    step = 4 if header[0] >= "v1.2" else 3
    rows = []
    for n, line in enumerate(lines):
        parts = line.split()
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), step)}
        key = parts[3][: -(len(parts[0]) + 1)] if step == 4 else f"#{n}"  # member name minus .ext
        rows.append((key, members))
    if len(rows) != int(header[1]):
        raise ConfigError(f"{url} announces {header[1]} samples but lists {len(rows)}")
    return rows


def stage_indexes(shards: ShardSet, cache_dir: str | None) -> list[str]:
    """Local paths of the `.idx` files (DALI reads indexes only from the local file system).

    The ranks of a node stage into the same cache at the same time: each writes its own temporary file
    and renames it over the target (atomic on one file system), so a reader sees a complete index or none.
    """
    if all("://" not in u or u.startswith("file://") for u in shards.index_urls):
        return [u.removeprefix("file://") for u in shards.index_urls]
    cache = Path(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "pipeline-idx"))
    cache.mkdir(parents=True, exist_ok=True)
    local = []
    for url in shards.index_urls:
        target = cache / url.replace("://", "/").replace("/", "_")
        if not target.exists():
            with fsspec.open(url, "rb") as src:
                data = src.read()
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        local.append(str(target))
    return local


class SampleReader:
    """Reads members by (shard, offset, size); keeps one open handle per shard (per process)."""

    def __init__(self, shards: ShardSet) -> None:
        self.shards = shards
        self._handles: dict[int, object] = {}

    def __getstate__(self) -> dict:  # open handles never cross into DataLoader workers
        return {"shards": self.shards, "_handles": {}}

    def read(self, shard: int, offset: int, size: int) -> bytes:
        handle = self._handles.get(shard)
        if handle is None:
            url = self.shards.shard_urls[shard]
            # remote: small read-ahead blocks, since samples are read in a shuffled order within a window
            remote = {"block_size": REMOTE_BLOCK_BYTES, "cache_type": "readahead"} if "://" in url else {}
            fs, path = fsspec.core.url_to_fs(url)
            try:
                handle = fs.open(path, "rb", **remote)
            except FileNotFoundError as e:  # the storage lost it: not a damaged sample to skip
                raise UnreadableShards(
                    f"{url} no longer exists; put it back and run the same command again to resume from the "
                    "newest checkpoint, or shard into a new folder"
                ) from e
            self._handles[shard] = handle
        handle.seek(offset)
        data = handle.read(size)
        if len(data) != size:
            raise OSError(f"short read: {len(data)} of {size} bytes")
        return data

    def image_bytes(self, sample_id: int) -> bytes:
        offset, size = self.shards.image[sample_id]
        return self.read(int(self.shards.shard_of[sample_id]), int(offset), int(size))

    def label(self, sample_id: int) -> int:
        offset, size = self.shards.cls_member[sample_id]
        if offset < 0:
            return -1
        return int(self.read(int(self.shards.shard_of[sample_id]), int(offset), int(size)).decode().strip())


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}" if "://" in root else str(Path(root) / name)
