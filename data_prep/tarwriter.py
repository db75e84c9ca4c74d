"""A minimal deterministic tar (ustar) writer for shards.

Why not `tarfile`: building headers through TarInfo costs about as much as decoding a small JPEG,
and we need each member's data offset for the `.idx` anyway. Every member gets the same fixed
metadata (mode 0644, owner 0:0, mtime 0), so identical input gives byte-identical shards.
"""

from __future__ import annotations

from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # archives end on a record boundary, as GNU tar and Python's tarfile write them


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file; `name` must be ASCII and at most 100 bytes."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    header = bytearray(BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000644\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b" " * 8  # checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[329:345] = b"0000000\0" * 2  # device major/minor
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class TarWriter:
    """Appends members to `fileobj`; `add` returns the member's data offset (for the `.idx`)."""

    def __init__(self, fileobj: BinaryIO):
        self.fileobj = fileobj
        self.offset = 0

    def add(self, name: str, data: bytes) -> int:
        padding = -len(data) % BLOCK
        self.fileobj.write(ustar_header(name, len(data)))
        self.fileobj.write(data)
        self.fileobj.write(b"\0" * padding)
        data_offset = self.offset + BLOCK
        self.offset = data_offset + len(data) + padding
        return data_offset

    def close(self) -> None:
        end = self.offset + 2 * BLOCK  # two zero blocks mark the end of the archive
        self.fileobj.write(b"\0" * (2 * BLOCK + -end % RECORD))
