"""Which tars a shard spec names: a single `.tar`, a comma-separated list, a brace pattern
(`s3://b/shards-{000000..041407}.tar`, as webdataset and img2dataset write them) or a folder of tars.
A pattern or an explicit tar is expanded without touching the store: 41,408 names are 41,408 names,
not a paginated LIST of the bucket; only a folder is listed."""

from __future__ import annotations

import os
from collections.abc import Sequence

from braceexpand import braceexpand
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from data_prep.sources import SourceError, redact


def _top_level_split(spec: str) -> list[str]:
    """`a.tar,b-{0..3}.tar` -> [`a.tar`, `b-{0..3}.tar`]: commas inside braces are alternatives."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            raise SourceError(
                f"shard spec {redact(spec)!r}: unbalanced '}}'; expected e.g. shards-{{000..009}}.tar"
            )
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth:
        raise SourceError(
            f"shard spec {redact(spec)!r}: unbalanced '{{'; expected e.g. shards-{{000..009}}.tar"
        )
    return [p.strip() for p in [*parts, spec[start:]] if p.strip()]


def _absolute(url: str) -> str:
    return url if "://" in url else os.path.abspath(os.path.expanduser(url))


def _list_folder(url: str) -> list[str]:
    try:
        fs, root = url_to_fs(url)
        if not fs.isdir(root):
            raise SourceError(
                f"shard spec {redact(url)}: neither a .tar, a brace pattern nor a folder of tars"
            )
        names = sorted(p for p in fs.find(root, maxdepth=1) if p.endswith(".tar"))
    except SourceError:
        raise
    except Exception as e:  # credentials, permissions, network
        raise SourceError(redact(f"cannot list {url}: {type(e).__name__}: {e}".splitlines()[0])) from None
    if not names:
        raise SourceError(f"shard spec {redact(url)}: the folder holds no .tar files")
    local = isinstance(fs, LocalFileSystem)
    return [p if local else fs.unstrip_protocol(p) for p in names]


def expand_shard_spec(spec: str | Sequence[str]) -> list[str]:
    """Tar URLs (local paths made absolute) in the order the spec names them; a folder (or a pattern of
    folders) contributes its `*.tar` files sorted by name. Raises SourceError (one line) for an empty
    spec, unbalanced braces, a folder without tars or a name that repeats."""
    elements = (
        _top_level_split(spec) if isinstance(spec, str) else [s for e in spec for s in _top_level_split(e)]
    )
    if not elements:
        raise SourceError("empty shard spec: give a .tar, a list, a brace pattern or a folder of tars")
    urls: list[str] = []
    for element in elements:
        for name in braceexpand(element) if "{" in element else [element]:
            urls += [_absolute(name)] if name.endswith(".tar") else _list_folder(_absolute(name))
    seen: set[str] = set()
    for url in urls:
        if url in seen:
            raise SourceError(f"shard spec names {redact(url)} twice; each tar may appear once")
        seen.add(url)
    return urls
