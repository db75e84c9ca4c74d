"""What a data_prep shard folder holds, read straight from its tars: the tests' check on sharding."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from data_prep.manifest import read_manifest


def shard_samples(out: Path) -> dict[str, tuple[bytes, int | None]]:
    """{each sample's recorded source path: (image bytes, label or None)} over every shard of the manifest."""
    got = {}
    for split in read_manifest(str(out))["splits"].values():
        for entry in split["shards"]:
            with tarfile.open(out / entry["name"]) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar}
            for name, data in members.items():
                if name.endswith(".json"):
                    key = name.removesuffix(".json")
                    label = members.get(f"{key}.cls")
                    got[json.loads(data)["path"]] = (members[f"{key}.jpg"], int(label) if label else None)
    return got
