"""DALI's WebDataset index (`.idx`), byte for byte what NVIDIA's `wds2idx` writes.

Format v1.2: a header line `v1.2 <number of samples>`, then one line per sample listing each of its
members as `<extension> <data offset> <size> <member name>`, space separated. A sample is a run of
consecutive members sharing the basename (everything before the first dot of the file name); the data
offset is where the member's bytes start, 512 past its own header. DALI's `fn.readers.webdataset` seeks
with it. (For a member with a GNU long-name record, wds2idx, which asks GNU tar for header positions,
points at that record instead; ustar and pax tars, webdataset's among them, index identically.)
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from typing import BinaryIO

INDEX_VERSION = "v1.2"


def split_name(name: str) -> tuple[str, str]:
    """`dir/KEY.ext.more` -> (`dir/KEY`, `ext.more`), as wds2idx splits it."""
    dot = name.find(".", name.rfind("/") + 1)
    return name[:dot], name[dot + 1 :]


def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    """`.idx` text from samples, each a list of (extension, data offset, size, member name)."""
    if not samples:
        raise ValueError("empty WebDataset tar: no index can be written")
    lines = (" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in samples)
    return f"{INDEX_VERSION} {len(samples)}\n" + "".join(line + "\n" for line in lines)


BLOCK = 512
REGULAR = frozenset(b"07\0")  # typeflags tarfile's isreg() accepts (sparse "S" goes to tarfile itself)
GNU_LONG = (ord("L"), ord("K"))  # a GNU long name / long link name for the member that follows


class DamagedTar(ValueError):
    """The tar breaks off or has a corrupt header: one line saying where."""


class _UseTarfile(Exception):
    """A rare header kind (global pax header, base-256 size, sparse file) left to `tarfile`."""


def _nts(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_records(data: bytes) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records of a pax extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos] != 0:
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def iter_members(f: BinaryIO) -> Iterator[tuple[str, int, int, bool]]:
    """(name, data offset, size, is a regular file) per member, as `tarfile` reports them, reading only
    the 512-byte headers (and pax/long-name records): about 10x faster than `tarfile` in pure Python,
    and strict where `tarfile` stops quietly (a corrupt header, a member cut off by the end of file)."""
    end = f.seek(0, 2)
    offset, pax, long_name = 0, {}, None
    while True:
        f.seek(offset)
        header = f.read(BLOCK)
        if len(header) < BLOCK or not header.strip(b"\0"):
            if offset == 0 or header.strip(b"\0"):
                raise DamagedTar(f"no tar header at byte {offset} (empty, truncated or not a tar)")
            return  # the end-of-archive marker, or a tar ending right after its last member
        stored = int(header[148:156].strip(b" \0") or b"0", 8)
        unsigned = sum(header[:148]) + 256 + sum(header[156:])
        if stored != unsigned and stored != unsigned - 2 * sum(b for b in header if b > 127):  # signed sum
            raise DamagedTar(f"corrupt tar header at byte {offset} (checksum)")
        if header[124] & 0x80:
            raise _UseTarfile
        size = int(header[124:136].strip(b" \0") or b"0", 8)
        typeflag = header[156]
        data_offset = offset + BLOCK
        if typeflag in (ord("x"), *GNU_LONG):
            f.seek(data_offset)
            data = f.read(size)
            if typeflag == ord("x"):
                pax.update(_pax_records(data))
            elif typeflag == ord("L"):
                long_name = _nts(data)
            offset = data_offset + -(-size // BLOCK) * BLOCK
            continue
        if typeflag in (ord("g"), ord("S")):
            raise _UseTarfile
        name = _nts(header[:100])
        prefix = _nts(header[345:500])
        if prefix:
            name = f"{prefix}/{name}"
        name = pax.get("path", long_name or name)
        size = int(pax.get("size", size))
        regular = typeflag in REGULAR and not (typeflag == 0 and name.endswith("/"))
        if data_offset + size > end:
            raise DamagedTar(f"member {name} at byte {offset} is cut off by the end of the file")
        yield name, data_offset, size, regular
        offset = data_offset + -(-size // BLOCK) * BLOCK
        pax, long_name = {}, None


def _tarfile_members(f: BinaryIO) -> Iterator[tuple[str, int, int, bool]]:
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            yield member.name, member.offset_data, member.size, member.isreg()


def scan(tar_file: BinaryIO, keep: frozenset[str] = frozenset()) -> tuple[list, dict[tuple[str, str], bytes]]:
    """One pass over a tar: its samples as `format_index` takes them, and the bytes of every member whose
    extension is in `keep` (small members such as `cls` or `json`), keyed by (basename, extension)."""
    try:
        return _scan(tar_file, iter_members(tar_file), keep)
    except _UseTarfile:
        return _scan(tar_file, _tarfile_members(tar_file), keep)


def _scan(f: BinaryIO, members: Iterator, keep: frozenset[str]) -> tuple[list, dict[tuple[str, str], bytes]]:
    samples: list[list[tuple[str, int, int, str]]] = []
    kept: dict[tuple[str, str], bytes] = {}
    last_basename = None
    for name, data_offset, size, regular in members:
        if not regular:
            continue
        basename, extension = split_name(name)
        if not basename or basename.endswith("/"):  # hidden files, as wds2idx skips them
            continue
        component = (extension, data_offset, size, name)
        if basename != last_basename:
            samples.append([component])
            last_basename = basename
        else:
            samples[-1].append(component)
        if extension in keep:  # iter_members seeks to each header itself
            f.seek(data_offset)
            kept[basename, extension] = f.read(size)
    return samples, kept


def build_index(tar_file: BinaryIO) -> str:
    """The `.idx` text for a complete tar archive, given as a seekable binary file."""
    return format_index(scan(tar_file)[0])
