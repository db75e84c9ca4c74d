"""`verify`: re-read every shard listed in manifest.json and prove it intact: whole-shard size and
sha256, the `.idx` against the tar, and per sample its members, content hash, label and a full decode.
Shards data_prep did not write (adopted by `data_prep index`: no sha256 in the manifest) are checked for
what they have: tar structure, size, index agreement, one decodable image per sample and, when the
manifest names a label member, a label that fits the classes."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass, field

from fsspec.core import url_to_fs
from PIL import Image
from tqdm import tqdm

from data_prep.image import Rejected, check_image
from data_prep.index import build_index, split_name
from data_prep.manifest import read_manifest, resolve, shard_folder


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


FOREIGN_IMAGES = ("jpg", "jpeg", "png", "webp")  # training's image member: the first of these present


def _foreign_label(members: dict[str, bytes], label: dict, classes: list[str]) -> str | None:
    """Why the sample's label does not fit the manifest's `label` spec and classes; None when it does."""
    raw = members.get(label["member"])
    if raw is None:
        return f"no .{label['member']} member for the label"
    try:
        value = json.loads(raw)[label["field"]] if label["member"] == "json" else int(raw)
    except (ValueError, KeyError, TypeError):
        return f"unreadable label in .{label['member']}"
    if isinstance(value, str) and value in classes:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(classes):
        return None
    return f"label {value!r} is not one of {len(classes)} classes"


def _check_foreign_sample(name: str, key: str, members: dict[str, bytes], manifest: dict) -> list[Problem]:
    image = next((ext for ext in FOREIGN_IMAGES if ext in members), None)
    if image is None:
        return [Problem(name, key, f"no image member: members {sorted(members)}")]
    try:
        with Image.open(io.BytesIO(members[image])) as im:
            im.load()
    except Exception as e:
        return [Problem(name, key, f"image does not decode: {type(e).__name__}: {e}")]
    if manifest.get("label") and manifest["classes"]:
        reason = _foreign_label(members, manifest["label"], manifest["classes"])
        if reason:
            return [Problem(name, key, reason)]
    return []


def verify_shard(entry: dict, data: bytes, index_text: str | None, manifest: dict) -> list[Problem]:
    """Problems found in one shard's bytes against its manifest `entry` ([] when intact)."""
    name = entry["name"]
    problems = []
    own = "sha256" in entry  # written by data_prep: its own .json schema and checksums apply
    whole_ok = len(data) == entry["bytes"] and (
        not own or hashlib.sha256(data).hexdigest() == entry["sha256"]
    )
    if not whole_ok:
        what = "sha256 differs from the manifest" if own else f"the manifest says {entry['bytes']}"
        problems.append(Problem(name, None, f"{len(data)} bytes, {what}"))
    samples, broken = _read_members(name, data)
    problems += broken
    for key, members in samples.items():
        if own:
            problems += _check_sample(name, key, members, len(manifest["classes"]))
        else:
            problems += _check_foreign_sample(name, key, members, manifest)
    if len(samples) != entry["samples"]:
        problems.append(Problem(name, None, f"{len(samples)} samples, manifest says {entry['samples']}"))
    if index_text is None:
        problems.append(Problem(name, None, f"index {entry['index']} missing"))
    elif (whole_ok or not own) and not broken and index_text != build_index(io.BytesIO(data)):
        problems.append(Problem(name, None, f"index {entry['index']} does not match the tar"))
    return problems


def verify(url: str, progress: bool = False) -> Report:
    start = time.perf_counter()
    try:
        manifest = read_manifest(url)
    except Exception as e:
        message = f"cannot read manifest of {url}: {type(e).__name__}: {e}"
        raise ManifestError(message.splitlines()[0]) from None
    folder = shard_folder(url)
    url_to_fs(folder)[0].invalidate_cache()
    entries = [s for split in manifest["splits"].values() for s in split["shards"]]
    report = Report()
    for entry in tqdm(entries, unit="shard", disable=not progress):
        report.shards += 1
        try:
            fs, path = url_to_fs(resolve(folder, entry["name"]))
            data = fs.cat_file(path)
        except (FileNotFoundError, OSError) as e:
            report.problems.append(Problem(entry["name"], None, f"unreadable: {type(e).__name__}: {e}"))
            continue
        fs, index_path = url_to_fs(resolve(folder, entry["index"]))
        index_text = fs.cat_file(index_path).decode() if fs.exists(index_path) else None
        report.problems += verify_shard(entry, data, index_text, manifest)
        report.samples += entry["samples"]
    report.seconds = time.perf_counter() - start
    return report
