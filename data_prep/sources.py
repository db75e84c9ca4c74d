"""Where images come from: a folder (local or any fsspec URL such as `s3://bucket/prefix`), a text file
listing paths or URLs, or a tar/zip archive. Listing happens once in the parent; workers re-open the
source from its picklable `SourceSpec` and read only the items of their shard."""

from __future__ import annotations

import os
import posixpath
import re
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

import fsspec
import pyarrow as pa
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from data_prep.index import split_name
from data_prep.tables import Columns, Table, TableReader, open_table, stream_rows

Kind = Literal["files", "tar", "zip", "table"]


class SourceError(Exception):
    """SRC cannot be used (missing, unreadable, bad credentials, lost mid-run): one line for the user."""


_QUERY = re.compile(r"(\b[a-zA-Z][\w+.-]*://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact(text: str) -> str:
    """`text` with the query string and fragment of every URL in it removed: presigned URLs carry
    credentials there (X-Amz-Signature, X-Amz-Credential, tokens), which must not reach shards,
    the manifest or a log line."""
    return _QUERY.sub(r"\1", text)


def connection_lost(error: BaseException) -> bool:
    """A failure of the connection, not of the item (the store went away): the run stops instead of
    rejecting every remaining image. Matched by class name across botocore, aiohttp and the stdlib."""
    names = {cls.__name__ for cls in type(error).__mro__}
    return bool(names & {"ConnectionError", "ClientConnectionError", "TimeoutError"})


@dataclass(frozen=True)
class Item:
    ref: str  # files: a local path or URL (with its query: presigned URLs need it); archives: the member
    path: str  # what the sample's .json records: relative to SRC for folders and archives; URLs redacted
    label: str | None  # class name


@dataclass(frozen=True)
class SourceSpec:
    kind: Kind
    url: str  # the archive for tar/zip; SRC itself for files and tables
    root: str = ""  # refs start with `root/`, which the recorded path leaves out; "": the path is the ref
    table: Table | None = None  # kind "table": the table whose rows hold the images

    def path_of(self, ref: str) -> str:
        """What a sample's .json records as its source: relative to SRC for folders and archives."""
        return ref[len(self.root) + 1 :] if self.root else redact(ref)


@dataclass(frozen=True)
class Listing:
    spec: SourceSpec
    items: list[Item]  # sorted, so the seeded shuffle is reproducible
    classes: list[str]  # sorted class names; index = label; [] when unlabelled


def _hidden(relpath: str) -> bool:
    return any(part.startswith(".") for part in relpath.split("/"))


def _with_labels(rels: list[tuple[str, str]], labels: str) -> tuple[list[Item], list[str]]:
    """(ref, path relative to the root) pairs -> items. With `auto`, the first folder of the relative
    path is the class, provided every file sits in one; a flat layout is unlabelled."""
    labelled = labels == "auto" and bool(rels) and all("/" in rel for _, rel in rels)
    items = [Item(ref, rel, rel.split("/", 1)[0] if labelled else None) for ref, rel in rels]
    return items, sorted({i.label for i in items if i.label is not None})


def _list_folder(fs: fsspec.AbstractFileSystem, root: str, src: str, labels: str) -> Listing:
    root = root.rstrip("/")
    local = isinstance(fs, LocalFileSystem)
    rels = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) + 1 :]
        if not _hidden(rel):
            rels.append((path if local else fs.unstrip_protocol(path), rel))
    if rels and all(rel.endswith(".tar") for _, rel in rels):
        raise SourceError(
            f"source {redact(src)} holds WebDataset tars, not images; adopt them as they are with "
            f"`python -m data_prep index {redact(src)}`"
        )
    items, classes = _with_labels(rels, labels)
    spec_root = root if local else fs.unstrip_protocol(root)
    return Listing(SourceSpec("files", src, spec_root), items, classes)


def _common_dir(names: list[str]) -> str:
    return posixpath.commonpath([posixpath.dirname(n) for n in names])


def _list_archive(kind: Kind, names: list[str], src: str, labels: str) -> Listing:
    names = sorted(n for n in names if not _hidden(n))
    if not names:
        return Listing(SourceSpec(kind, src), [], [])
    if len({split_name(n)[0] for n in names}) < len(names):  # a key with several members: WebDataset
        raise SourceError(
            f"source {redact(src)} is a WebDataset tar (samples of several members); adopt it as it is "
            f"with `python -m data_prep index {redact(src)}`"
        )
    root = _common_dir(names)
    rels = [(n, n[len(root) + 1 :] if root else n) for n in names]
    items, classes = _with_labels(rels, labels)
    return Listing(SourceSpec(kind, src, root), items, classes)


def _list_text(fs: fsspec.AbstractFileSystem, path: str, src: str, labels: str) -> Listing:
    """One path or URL per line, optionally followed by a TAB and a class name; `#` starts a comment.
    Relative paths are relative to the list file's folder (local or remote)."""
    try:
        text = fs.cat_file(path).decode()
    except UnicodeDecodeError:
        raise SourceError(
            f"source {redact(src)} is neither a folder, a tar/zip archive nor a text list"
        ) from None
    local = isinstance(fs, LocalFileSystem)
    base = os.path.dirname(os.path.abspath(path)) if local else posixpath.dirname(fs.unstrip_protocol(path))
    entries = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        ref, _, label = line.partition("\t")
        ref = ref.strip()
        if "://" not in ref and not ref.startswith("/"):
            ref = os.path.join(base, ref) if local else posixpath.join(base, ref)
        entries.append((ref, label.strip() or None))
    labelled = labels == "auto" and bool(entries) and all(label for _, label in entries)
    items = sorted(
        (Item(ref, redact(ref), label if labelled else None) for ref, label in entries), key=lambda i: i.ref
    )
    return Listing(SourceSpec("files", src), items, sorted({i.label for i in items if i.label}))


def list_source(src: str, labels: str = "auto") -> Listing:
    """List every candidate image in `src` (no image is opened here; bad ones are rejected later)."""
    try:
        fs, path = url_to_fs(src)
        if not fs.exists(path):
            raise SourceError(f"source not found: {redact(src)}")
        if fs.isdir(path):
            return _list_folder(fs, path, src, labels)
        with fs.open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                f.seek(0)
                with zipfile.ZipFile(f) as z:
                    names = [i.filename for i in z.infolist() if not i.is_dir()]
                return _list_archive("zip", names, src, labels)
            f.seek(0)
            try:
                with tarfile.open(fileobj=f, mode="r:*") as tar:
                    return _list_archive("tar", [m.name for m in tar if m.isreg()], src, labels)
            except tarfile.ReadError:
                pass
        return _list_text(fs, path, src, labels)
    except SourceError:
        raise
    except Exception as e:  # credentials, permissions, network: the library's own words, on one line
        raise SourceError(
            redact(f"cannot read source {src}: {type(e).__name__}: {e}".splitlines()[0])
        ) from None


@dataclass(frozen=True)
class StreamedListing:
    """A listing read in batches: `batches` yields (refs, labels), lists or Arrow arrays, with labels as
    class names, ints or None per item, or None for an unlabelled batch; `class_names` are fixed by the
    source (a datasets ClassLabel), else () and the classes are the names (or 0..max of the ints) seen."""

    spec: SourceSpec
    batches: Iterator[tuple[list[str] | pa.Array, list | pa.Array | None]]
    class_names: tuple[str, ...] = ()


def stream_listing(src: str, labels: str = "auto", columns: Columns | None = None) -> StreamedListing:
    """A table is streamed in row batches; other sources are listed whole (their listing is the folder
    tree or the text itself) and handed out as one batch."""
    try:
        table = open_table(src, columns or Columns(), labels)
    except Exception as e:  # TableError, or the store/format library's own words
        if isinstance(e, FileNotFoundError):
            raise SourceError(f"source not found: {redact(src)}") from None
        line = f"cannot read table {src}: {type(e).__name__}: {e}".splitlines()[0]
        raise SourceError(redact(line)) from None
    if table is None:
        listing = list_source(src, labels)
        batch = ([i.ref for i in listing.items], [i.label for i in listing.items])
        return StreamedListing(listing.spec, iter([batch] if listing.items else []))
    spec = SourceSpec("table" if table.embedded else "files", src, table=table if table.embedded else None)
    return StreamedListing(spec, stream_rows(table), table.class_names)


class Reader:
    """Reads items' bytes inside a worker; an exception in place of bytes means that item is unreadable.
    An archive is opened once, on first use, and kept open until `close`."""

    def __init__(self, spec: SourceSpec):
        self.spec = spec
        self._file: BinaryIO | None = None
        self._archive: tarfile.TarFile | zipfile.ZipFile | None = None
        self._members: dict[str, tarfile.TarInfo] = {}
        self._table = TableReader(spec.table) if spec.table else None

    def _open_archive(self) -> tarfile.TarFile | zipfile.ZipFile:
        if self._archive is None:
            self._file = fsspec.open(self.spec.url, "rb").open()
            if self.spec.kind == "zip":
                self._archive = zipfile.ZipFile(self._file)
            else:
                self._archive = tarfile.open(fileobj=self._file, mode="r:*")  # noqa: SIM115 (closed in close())
                self._members = {m.name: m for m in self._archive if m.isreg()}
        return self._archive

    def close(self) -> None:
        if self._table is not None:
            self._table.close()
        if self._archive is not None:
            self._archive.close()
            self._file.close()
            self._archive = self._file = None

    def _read_member(self, name: str) -> bytes | Exception:
        try:
            archive = self._open_archive()
            if isinstance(archive, zipfile.ZipFile):
                return archive.read(name)
            return archive.extractfile(self._members[name]).read()
        except Exception as e:
            return e

    def read_many(self, refs: list[str]) -> list[bytes | Exception]:
        if self._table is not None:
            return self._table.read_many(refs)
        if self.spec.kind != "files":
            return [self._read_member(r) for r in refs]
        remote = [r for r in refs if "://" in r and not r.startswith("file://")]
        fetched: dict[str, bytes | Exception] = {}
        if remote:  # one concurrent batch per shard: object stores reward many requests in flight
            fs, _ = url_to_fs(remote[0])
            by_path = fs.cat([fs._strip_protocol(r) for r in remote], on_error="return")
            for r in remote:  # HTTP leaves a missing URL out of the result
                fetched[r] = by_path.get(fs._strip_protocol(r), FileNotFoundError("no such URL"))
                if isinstance(fetched[r], Exception) and connection_lost(fetched[r]):
                    line = f"lost the source while reading {r}: {type(fetched[r]).__name__}: {fetched[r]}"
                    raise SourceError(
                        redact(line.splitlines()[0]) + "; finished shards are kept, re-run to resume"
                    )
        return [fetched[r] if r in fetched else _read_local(r) for r in refs]


def _read_local(path: str) -> bytes | Exception:
    try:
        with open(path.removeprefix("file://"), "rb") as f:
            return f.read()
    except Exception as e:
        return e
