"""DALI's WebDataset index (`.idx`), byte for byte what NVIDIA's `wds2idx` writes.

Format v1.2: a header line `v1.2 <number of samples>`, then one line per sample listing each of its
members as `<extension> <data offset> <size> <member name>`, space separated. A sample is a run of
consecutive members sharing the basename (everything before the first dot of the file name); the data
offset is the member's 512-byte header position plus 512. DALI's `fn.readers.webdataset` seeks with it.
"""

from __future__ import annotations

import tarfile
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


def scan(tar_file: BinaryIO, keep: frozenset[str] = frozenset()) -> tuple[list, dict[tuple[str, str], bytes]]:
    """One pass over a tar: its samples as `format_index` takes them, and the bytes of every member whose
    extension is in `keep` (small members such as `cls` or `json`), keyed by (basename, extension)."""
    samples: list[list[tuple[str, int, int, str]]] = []
    kept: dict[tuple[str, str], bytes] = {}
    last_basename = None
    with tarfile.open(fileobj=tar_file, mode="r:") as tar:
        for member in tar:
            if not member.isreg():
                continue
            basename, extension = split_name(member.name)
            if not basename or basename.endswith("/"):  # hidden files, as wds2idx skips them
                continue
            component = (extension, member.offset_data, member.size, member.name)
            if basename != last_basename:
                samples.append([component])
                last_basename = basename
            else:
                samples[-1].append(component)
            if extension in keep:
                kept[basename, extension] = tar.extractfile(member).read()
    return samples, kept


def build_index(tar_file: BinaryIO) -> str:
    """The `.idx` text for a complete tar archive, given as a seekable binary file."""
    return format_index(scan(tar_file)[0])
