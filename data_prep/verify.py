"""`verify`: re-read every shard listed in manifest.json and prove it intact: whole-shard size and
sha256, the `.idx` against the tar, and per sample its members, content hash, label and a full decode."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field

from fsspec.core import url_to_fs
from tqdm import tqdm

from data_prep.image import Rejected, check_image
from data_prep.index import build_index, split_name
from data_prep.manifest import join, read_manifest, shard_folder


class ManifestError(Exception):
    """OUT has no readable manifest.json: nothing to verify against."""


@dataclass(frozen=True)
class Problem:
    shard: str
    key: str | None  # None: the shard as a whole
    reason: str

    def __str__(self) -> str:
        return f"{self.shard} key {self.key}: {self.reason}" if self.key else f"{self.shard}: {self.reason}"


@dataclass
class Report:
    shards: int = 0
    samples: int = 0
    seconds: float = 0.0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        verdict = "OK" if self.ok else f"DAMAGED ({len(self.problems)} problems)"
        counts = f"{self.shards} shards, {self.samples} samples"
        return f"data_prep verify: {verdict}: {counts}, {self.seconds:.1f} s"


def _read_members(name: str, data: bytes) -> tuple[dict[str, dict[str, bytes]], list[Problem]]:
    """{key: {extension: bytes}} in tar order, plus a problem where the tar breaks off. `tarfile`
    stops quietly at a damaged header or a truncated end, so what follows the last member is checked:
    it must be the end-of-archive marker (two zero blocks) and nothing but zeros."""
    samples: dict[str, dict[str, bytes]] = {}
    key = None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, extension = split_name(member.name)
                samples.setdefault(key, {})[extension] = tar.extractfile(member).read()
            rest = data[tar.offset :]
    except (tarfile.TarError, EOFError, OSError) as e:
        return samples, [Problem(name, None, f"tar unreadable {_after(key)}: {e}")]
    if len(rest) < 2 * tarfile.BLOCKSIZE:
        return samples, [Problem(name, None, f"tar truncated {_after(key)}: no end-of-archive marker")]
    if rest.strip(b"\0"):
        return samples, [Problem(name, None, f"tar header damaged {_after(key)}: data follows the stop")]
    return samples, []


def _after(key: str | None) -> str:
    return f"after key {key}" if key else "at the start"


def _check_sample(name: str, key: str, members: dict[str, bytes], num_classes: int) -> list[Problem]:
    images = [ext for ext in ("jpg", "png") if ext in members]
    if len(images) != 1 or "json" not in members:
        return [Problem(name, key, f"incomplete sample: members {sorted(members)}")]
    data = members[images[0]]
    try:
        meta = json.loads(members["json"])
    except ValueError:
        return [Problem(name, key, "unreadable .json")]
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        return [Problem(name, key, f"image sha256 does not match its .json ({meta.get('path')})")]
    if num_classes:
        label = members.get("cls", b"").decode(errors="replace")
        if not label.isdigit() or int(label) >= num_classes:
            return [Problem(name, key, f"bad .cls {label!r} for {num_classes} classes")]
    try:
        image = check_image(data)
    except Rejected as e:
        return [Problem(name, key, f"image does not decode: {e}")]
    if (image.width, image.height) != (meta.get("width"), meta.get("height")):
        return [Problem(name, key, f"size {image.width}x{image.height} differs from its .json")]
    return []


def verify_shard(entry: dict, data: bytes, index_text: str | None, num_classes: int) -> list[Problem]:
    """Problems found in one shard's bytes against its manifest `entry` ([] when intact)."""
    name = entry["name"]
    problems = []
    whole_ok = len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"]
    if not whole_ok:
        problems.append(Problem(name, None, f"{len(data)} bytes, sha256 differs from the manifest"))
    samples, broken = _read_members(name, data)
    problems += broken
    for key, members in samples.items():
        problems += _check_sample(name, key, members, num_classes)
    if len(samples) != entry["samples"]:
        problems.append(Problem(name, None, f"{len(samples)} samples, manifest says {entry['samples']}"))
    if index_text is None:
        problems.append(Problem(name, None, f"index {entry['index']} missing"))
    elif whole_ok and index_text != build_index(io.BytesIO(data)):
        problems.append(Problem(name, None, f"index {entry['index']} does not match the tar"))
    return problems


def verify(url: str, progress: bool = False) -> Report:
    start = time.perf_counter()
    try:
        manifest = read_manifest(url)
    except Exception as e:
        message = f"cannot read manifest of {url}: {type(e).__name__}: {e}"
        raise ManifestError(message.splitlines()[0]) from None
    fs, root = url_to_fs(shard_folder(url))
    fs.invalidate_cache(root)
    entries = [s for split in manifest["splits"].values() for s in split["shards"]]
    report = Report()
    for entry in tqdm(entries, unit="shard", disable=not progress):
        report.shards += 1
        try:
            data = fs.cat_file(join(root, entry["name"]))
        except (FileNotFoundError, OSError) as e:
            report.problems.append(Problem(entry["name"], None, f"unreadable: {type(e).__name__}: {e}"))
            continue
        index_path = join(root, entry["index"])
        index_text = fs.cat_file(index_path).decode() if fs.exists(index_path) else None
        report.problems += verify_shard(entry, data, index_text, len(manifest["classes"]))
        report.samples += entry["samples"]
    report.seconds = time.perf_counter() - start
    return report
