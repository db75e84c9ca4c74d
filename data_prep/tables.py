"""Tables people already have, read in row batches with pyarrow (never the whole table in memory):
a parquet/CSV/TSV listing of image paths or URLs (img2dataset's input, an S3 Inventory export), and
tables that hold the images themselves: a Hugging Face `datasets` folder (`save_to_disk`: Arrow stream
files) or Hub-style parquet shards, with an image column of `{"bytes", "path"}` structs."""

from __future__ import annotations

import bisect
import itertools
import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

BATCH_ROWS = 65536
LISTING_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv"}
PATH_COLUMNS = ("url", "path", "image_path", "file", "filename", "key")  # tried in order
IMAGE_COLUMNS = ("image", "img", "jpg", "png")
LABEL_COLUMNS = ("label", "labels", "class", "cls")


class TableError(Exception):
    """The table cannot be used as asked (missing column, wrong type): one line naming it."""


@dataclass(frozen=True)
class Columns:
    """The user's choice of columns; None: the first present of the defaults (PATH_COLUMNS, ...)."""

    path: str | None = None
    image: str | None = None
    label: str | None = None


@dataclass(frozen=True)
class Table:
    url: str  # SRC as given
    fmt: str  # parquet | csv | tsv | arrow
    files: tuple[str, ...]  # full fsspec paths, in reading order
    ref_column: str  # the image column (embedded) or the path/URL column (listing)
    embedded: bool  # True: ref_column holds {"bytes", "path"} structs
    label_column: str | None
    class_names: tuple[str, ...]  # a datasets ClassLabel's names; () when the labels name themselves


def _schema(fs: fsspec.AbstractFileSystem, fmt: str, path: str) -> pa.Schema:
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            return pq.ParquetFile(f).schema_arrow
        if fmt == "arrow":
            return pa.ipc.open_stream(f).schema
        options = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",")
        return pcsv.open_csv(f, parse_options=options).schema


def _pick(
    schema: pa.Schema, given: str | None, defaults: tuple[str, ...], what: str, flag: str
) -> str | None:
    if given is not None:
        if given not in schema.names:
            raise TableError(f"{flag} {given!r}: no such column (have {', '.join(schema.names)})")
        return given
    return next((c for c in defaults if c in schema.names), None)


def _is_image_struct(field: pa.Field) -> bool:
    return pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0


def _hf_class_names(schema: pa.Schema, label: str | None) -> tuple[str, ...]:
    """A `datasets` ClassLabel column stores ints; its names travel in the schema's `huggingface`
    metadata (Arrow files of save_to_disk and Hub parquet shards alike)."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if label is None or meta is None:
        return ()
    info = json.loads(meta)
    feature = info.get("info", info).get("features", {}).get(label, {})
    return tuple(feature.get("names") or ())


def open_table(src: str, columns: Columns, labels: str) -> Table | None:
    """The table `src` names, or None when `src` is not a table (a folder of images, a text list, ...)."""
    fs, path = url_to_fs(src)
    folder = path.rstrip("/")
    if fs.isdir(folder):
        if fs.exists(posixpath.join(folder, "dataset_dict.json")):
            splits = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(folder) if fs.isdir(p))
            raise TableError(
                f"{src} is a datasets DatasetDict; give one split's folder ({', '.join(splits)})"
            )
        found = sorted(fs.find(folder))
        if fs.exists(posixpath.join(folder, "state.json")) and any(p.endswith(".arrow") for p in found):
            state = json.loads(fs.cat_file(posixpath.join(folder, "state.json")))
            files = [posixpath.join(folder, d["filename"]) for d in state["_data_files"]]
            fmt = "arrow"
        elif found and all(p.endswith(".parquet") for p in found if not _hidden(folder, p)):
            files, fmt = [p for p in found if not _hidden(folder, p)], "parquet"
        else:
            return None
    else:
        fmt = LISTING_SUFFIXES.get(posixpath.splitext(folder)[1].lower())
        if fmt is None:
            return None
        files = [folder]
    schema = _schema(fs, fmt, files[0])
    image = _pick(schema, columns.image, IMAGE_COLUMNS, "image", "--image-column")
    embedded = image is not None and _is_image_struct(schema.field(image))
    if columns.image is not None and not embedded:
        raise TableError(f"--image-column {image!r} does not hold {{bytes, path}} image structs")
    if embedded:
        ref = image
    else:
        ref = _pick(schema, columns.path, PATH_COLUMNS, "path", "--path-column")
        if ref is None:
            raise TableError(
                f"{src}: no image or path column (have {', '.join(schema.names)}); pass --path-column NAME"
            )
    label = (
        None if labels == "none" else _pick(schema, columns.label, LABEL_COLUMNS, "label", "--label-column")
    )
    names = _hf_class_names(schema, label)
    local = isinstance(fs, LocalFileSystem)
    full = tuple(f if local else fs.unstrip_protocol(f) for f in files)
    return Table(src, fmt, full, ref, embedded, label, names)


def _image_bytes(value: dict | None) -> bytes | Exception:
    """A datasets Image struct holds the bytes, or (not embedded) the path of the file to read."""
    if value and value.get("bytes"):
        return value["bytes"]
    path = (value or {}).get("path")
    if not path or not ("://" in path or path.startswith("/")):
        return ValueError(f"no image bytes in this row (path {path!r})")
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except Exception as e:
        return e


def _hidden(folder: str, path: str) -> bool:
    return any(part.startswith(".") for part in path[len(folder) + 1 :].split("/"))


def _file_batches(table: Table, file: str, columns: list[str]) -> Iterator[pa.RecordBatch]:
    with fsspec.open(file, "rb") as f:
        if table.fmt == "parquet":
            yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=columns)
        elif table.fmt == "arrow":
            for batch in pa.ipc.open_stream(f):
                yield batch.select(columns)
        else:
            options = pcsv.ParseOptions(delimiter="\t" if table.fmt == "tsv" else ",")
            # paths stay text ("001.jpg" is no number); a label column keeps its inferred int or text type
            types = {} if table.embedded else {table.ref_column: pa.string()}
            convert = pcsv.ConvertOptions(include_columns=columns, column_types=types)
            yield from pcsv.open_csv(f, parse_options=options, convert_options=convert)


def stream_rows(table: Table) -> Iterator[tuple[list[str] | pa.Array, pa.Array | None]]:
    """(refs, labels) per row batch, in table order, as Arrow arrays (no Python object per row). Refs
    are the path/URL column, or for embedded images `file-number:row` (the bytes stay in the table until
    a worker reads its shard)."""
    columns = [table.label_column] if table.label_column else []
    if not table.embedded:
        columns = [table.ref_column, *columns]
    for number, file in enumerate(table.files):
        row = 0
        for batch in _file_batches(table, file, columns or [table.ref_column]):
            if table.embedded:
                refs: list[str] | pa.Array = [f"{number}:{r}" for r in range(row, row + batch.num_rows)]
            else:
                refs = batch.column(table.ref_column)
            row += batch.num_rows
            yield refs, batch.column(table.label_column) if table.label_column else None


class TableReader:
    """Reads the image bytes of `file-number:row` refs; one table file is kept open (memory-mapped when
    local) while consecutive shards read from it."""

    def __init__(self, table: Table):
        self.table = table
        self._open: tuple[int, pa.Table | pq.ParquetFile] | None = None

    def _file(self, number: int) -> pa.Table | pq.ParquetFile:
        if self._open is None or self._open[0] != number:
            file = self.table.files[number]
            if self.table.fmt == "arrow":
                source = (
                    pa.memory_map(file)
                    if "://" not in file
                    else pa.BufferReader(fsspec.open(file).open().read())
                )
                data: pa.Table | pq.ParquetFile = pa.ipc.open_stream(
                    source
                ).read_all()  # zero-copy when mapped
            else:
                data = pq.ParquetFile(fsspec.open(file, "rb").open())
            self._open = (number, data)
        return self._open[1]

    def _rows(self, number: int, rows: list[int]) -> list[bytes | Exception]:
        data = self._file(number)
        if isinstance(data, pa.Table):
            column = data.column(self.table.ref_column).take(pa.array(rows))
        else:  # parquet: only the row groups that hold the rows
            sizes = [data.metadata.row_group(g).num_rows for g in range(data.num_row_groups)]
            starts = list(itertools.accumulate(sizes, initial=0))
            groups = sorted({bisect.bisect_right(starts, r) - 1 for r in rows})
            before = dict(
                zip(groups, itertools.accumulate((sizes[g] for g in groups), initial=0), strict=False)
            )
            local = [before[g] + r - starts[g] for r in rows for g in [bisect.bisect_right(starts, r) - 1]]
            part = data.read_row_groups(groups, columns=[self.table.ref_column])
            column = part.column(self.table.ref_column).take(pa.array(local))
        return [_image_bytes(value) for value in column.to_pylist()]

    def read_many(self, refs: list[str]) -> list[bytes | Exception]:
        by_file: dict[int, list[int]] = {}
        for ref in refs:
            number, row = ref.split(":")
            by_file.setdefault(int(number), []).append(int(row))
        got: dict[str, bytes | Exception] = {}
        for number, rows in by_file.items():
            for row, data in zip(rows, self._rows(number, rows), strict=True):
                got[f"{number}:{row}"] = data
        return [got[ref] for ref in refs]

    def close(self) -> None:
        self._open = None
