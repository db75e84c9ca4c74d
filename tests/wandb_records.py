"""Offline W&B run files read back: every record, with wandb's own record protobuf."""

from __future__ import annotations

import struct
from pathlib import Path


def wandb_records(out: Path) -> list[tuple[str, str, object]]:
    """(run folder, record type, record) of every offline run file under `out/wandb`, in order. The files
    are leveldb logs: 32 KiB blocks of fragments with a 7-byte header."""
    from wandb.proto import wandb_internal_pb2

    records = []
    for path in sorted((out / "wandb").glob("offline-run-*/run-*.wandb")):
        data, pos, block, chunk = path.read_bytes(), 7, 32768, b""
        while pos + 7 <= len(data):
            if block - pos % block < 7:  # block trailer padding
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            chunk += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # FULL or LAST fragment
                record = wandb_internal_pb2.Record()
                record.ParseFromString(chunk)
                chunk = b""
                records.append((path.parent.name, record.WhichOneof("record_type"), record))
    return records
