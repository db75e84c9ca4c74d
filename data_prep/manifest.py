"""`manifest.json`: the one file readers trust. It is written last and atomically, so its presence means
every shard it lists is complete."""

from __future__ import annotations

import json
import os
import uuid

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def join(base: str, name: str) -> str:
    """`base/name` for a local folder or an fsspec URL."""
    return f"{base.rstrip('/')}/{name}"


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see either the old file or the whole new one: a local temp file renamed into place, or a
    single object PUT (object stores publish an object only once its upload completes)."""
    if isinstance(fs, LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_manifest(out: str, manifest: dict) -> None:
    fs, root = url_to_fs(out)
    write_atomic(fs, join(root, MANIFEST_NAME), json.dumps(manifest, indent=1).encode())


def read_manifest(url: str) -> dict:
    """The manifest of a shard folder/URL (`url` is the folder, or the manifest.json itself)."""
    path = url if url.rstrip("/").endswith(MANIFEST_NAME) else join(url, MANIFEST_NAME)
    with fsspec.open(path, "rb") as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported manifest format {manifest.get('format')!r}")
    return manifest


def shard_folder(url: str) -> str:
    return url.rstrip("/").removesuffix(MANIFEST_NAME).rstrip("/") or "/"


def resolve(folder: str, name: str) -> str:
    """A manifest entry's file: a name relative to the manifest's folder, or an absolute path or URL as
    is (`data_prep index` names the original tars where they lie)."""
    return name if "://" in name or name.startswith("/") else join(folder, name)


def split_shards(url: str, split: str) -> list[str]:
    """Full paths/URLs of `split`'s shards, in manifest order."""
    manifest = read_manifest(url)
    if split not in manifest["splits"]:
        raise KeyError(f"{url}: no split {split!r} (have {sorted(manifest['splits'])})")
    return [resolve(shard_folder(url), s["name"]) for s in manifest["splits"][split]["shards"]]


def split_indexes(url: str, split: str) -> list[str]:
    """Full paths/URLs of `split`'s DALI `.idx` files, aligned with `split_shards`."""
    manifest = read_manifest(url)
    return [resolve(shard_folder(url), s["index"]) for s in manifest["splits"][split]["shards"]]
