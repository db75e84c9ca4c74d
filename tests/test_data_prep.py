"""data_prep on local folders: the shard format, sources, rejected inputs, resume and verify."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from wds2idx import IndexCreator

from data_prep.__main__ import main
from data_prep.manifest import read_manifest, split_shards

REPO = Path(__file__).resolve().parent.parent


def shard(src: Path | str, out: Path | str, *flags: str) -> int:
    return main(["shard", str(src), str(out), "--seed", "0", *flags])


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def shard_files(folder: Path) -> dict[str, bytes]:
    """Every shard and index in `folder` (manifest excluded: it records its creation time)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix in (".tar", ".idx")}


def test_sample_shards_format(sample_shards: Path, sample_dir: Path, tmp_path: Path) -> None:
    manifest = read_manifest(str(sample_shards))
    classes = sorted(p.name for p in (sample_dir / "train").iterdir())
    assert manifest["classes"] == classes
    assert manifest["total_samples"] == 2000 and manifest["rejected"] == []
    shards = manifest["splits"]["train"]["shards"]
    assert [s["samples"] for s in shards] == [250] * 8
    assert split_shards(str(sample_shards), "train") == [str(sample_shards / s["name"]) for s in shards]

    seen = []
    for entry in shards:
        tar_path = sample_shards / entry["name"]
        data = tar_path.read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
        # the .idx is byte-identical to what NVIDIA's own wds2idx writes for this tar
        with IndexCreator(str(tar_path), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert (sample_shards / entry["index"]).read_text() == (tmp_path / "ref.idx").read_text()
        members = tar_members(tar_path)
        keys = sorted({name.split(".")[0] for name in members})
        assert len(keys) == 250
        shard_labels = set()
        for key in keys:
            meta = json.loads(members[f"{key}.json"])
            original = (sample_dir / "train" / meta["path"]).read_bytes()
            assert members[f"{key}.jpg"] == original  # original bytes, not re-encoded
            assert meta["sha256"] == hashlib.sha256(original).hexdigest()
            assert (meta["width"], meta["height"]) == (32, 32)
            label = int(members[f"{key}.cls"])
            assert classes[label] == meta["path"].split("/")[0]
            shard_labels.add(label)
            seen.append(meta["path"])
        assert len(shard_labels) >= 8  # the seeded shuffle mixes classes within a shard
    expected = sorted(str(p.relative_to(sample_dir / "train")) for p in (sample_dir / "train").rglob("*.jpg"))
    assert sorted(seen) == expected  # every image exactly once


def test_sample_val_shards(sample_val_shards: Path) -> None:
    manifest = read_manifest(str(sample_val_shards))
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [250, 250]
    assert len(manifest["classes"]) == 10 and manifest["total_samples"] == 500


def write_bad_inputs(folder: Path) -> dict[str, str]:
    """Bad files of every kind among the good ones; returns {relative path: expected reason prefix}."""
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(png, "PNG")
    corrupt_png = bytearray(png.getvalue())
    corrupt_png[corrupt_png.find(b"IDAT") + 60] ^= 0xFF
    good_jpeg = next((folder / "cat").iterdir()).read_bytes()
    (folder / "cat" / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "cat" / "corrupt.png").write_bytes(bytes(corrupt_png))
    (folder / "dog" / "empty.jpg").write_bytes(b"")
    (folder / "dog" / "notes.txt").write_text("not a picture\n")
    (folder / "dog" / "fake.jpg").write_bytes(b"<html>404 not found</html>")
    (folder / "dog" / "unreadable.jpg").symlink_to(folder / "gone.jpg")  # root can read any mode bits
    return {
        "cat/truncated.jpg": "corrupt image",
        "cat/corrupt.png": "corrupt image",
        "dog/empty.jpg": "empty file",
        "dog/notes.txt": "not an image",
        "dog/fake.jpg": "not an image",
        "dog/unreadable.jpg": "unreadable: FileNotFoundError",
    }


def small_folder(sample_dir: Path, dest: Path, classes: tuple[str, ...], per_class: int) -> Path:
    for name in classes:
        (dest / name).mkdir(parents=True)
        for image in sorted((sample_dir / "train" / name).iterdir())[:per_class]:
            shutil.copy(image, dest / name / image.name)
    return dest


def test_bad_inputs_are_rejected_and_counted(sample_dir: Path, tmp_path: Path, capsys) -> None:
    src = small_folder(sample_dir, tmp_path / "src", ("cat", "dog"), 20)
    expected = write_bad_inputs(src)
    assert shard(src, tmp_path / "out", "--samples-per-shard", "16") == 0
    assert "6 rejected" in capsys.readouterr().out
    manifest = read_manifest(str(tmp_path / "out"))
    assert manifest["total_samples"] == 40 and manifest["classes"] == ["cat", "dog"]
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert reasons.keys() == expected.keys()
    for path, prefix in expected.items():
        assert reasons[path].startswith(prefix), (path, reasons[path])
    assert main(["verify", str(tmp_path / "out")]) == 0


def test_archives_lists_and_val_split_give_the_same_samples(sample_dir: Path, tmp_path: Path) -> None:
    src = small_folder(sample_dir, tmp_path / "data" / "imgs", ("bird", "frog", "ship"), 30)
    with tarfile.open(tmp_path / "imgs.tar", "w") as tar:
        tar.add(src, arcname="imgs")
    with zipfile.ZipFile(tmp_path / "imgs.zip", "w") as z:
        for path in sorted(src.rglob("*.jpg")):
            z.write(path, f"imgs/{path.relative_to(src)}")
    flags = ("--samples-per-shard", "25", "--val-fraction", "0.2")
    outputs = {}
    for kind, source in (("folder", src), ("tar", tmp_path / "imgs.tar"), ("zip", tmp_path / "imgs.zip")):
        assert shard(source, tmp_path / kind, *flags) == 0
        outputs[kind] = shard_files(tmp_path / kind)
    manifest = read_manifest(str(tmp_path / "folder"))
    assert {s: manifest["splits"][s]["samples"] for s in ("train", "val")} == {"train": 72, "val": 18}
    assert sorted(outputs["folder"]) == [
        "train-000000.idx",
        "train-000000.tar",
        "train-000001.idx",
        "train-000001.tar",
        "train-000002.idx",
        "train-000002.tar",
        "val-000000.idx",
        "val-000000.tar",
    ]
    # relative paths and labels agree, so a tar, a zip and the folder give byte-identical shards
    assert outputs["folder"] == outputs["tar"] == outputs["zip"]

    listing = tmp_path / "list.txt"
    lines = [f"{p.relative_to(tmp_path)}\t{p.parent.name}" for p in sorted(src.rglob("*.jpg"))]  # relative
    listing.write_text("# path<TAB>class\n" + "\n".join(lines) + "\n")
    assert shard(listing, tmp_path / "list", "--samples-per-shard", "100") == 0
    listed = read_manifest(str(tmp_path / "list"))
    assert listed["classes"] == ["bird", "frog", "ship"] and listed["total_samples"] == 90
    assert shard(listing, tmp_path / "nolabels", "--labels", "none") == 0
    members = tar_members(tmp_path / "nolabels" / "train-000000.tar")
    assert not any(name.endswith(".cls") for name in members)


def test_resize_short_reencodes(sample_dir: Path, tmp_path: Path) -> None:
    src = small_folder(sample_dir, tmp_path / "src", ("deer",), 5)
    assert shard(src, tmp_path / "out", "--resize-short", "20") == 0
    members = tar_members(tmp_path / "out" / "train-000000.tar")
    for key in ("00000000", "00000004"):
        meta = json.loads(members[f"{key}.json"])
        image = Image.open(io.BytesIO(members[f"{key}.jpg"]))
        assert image.size == (meta["width"], meta["height"]) == (20, 20)
        assert hashlib.sha256(members[f"{key}.jpg"]).hexdigest() == meta["sha256"]


def worker_pids(parent: int) -> list[int]:
    """Pids of the spawned pool workers of process `parent`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit():
                continue
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and b"spawn_main" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return pids


@pytest.mark.slow  # a data_prep process and its two spawned workers, then four more runs of 200 shards
def test_killed_worker_then_rerun_is_identical(sample_dir: Path, tmp_path: Path, capsys) -> None:
    src, flags = sample_dir / "train", ("--samples-per-shard", "10")
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "data_prep", "shard", str(src), str(out), *flags, "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress = out / ".data_prep-progress"
    deadline = time.monotonic() + 60
    while not (progress.is_dir() and len(list(progress.glob("*.json"))) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before it could be interrupted"
        time.sleep(0.005)
    victims = worker_pids(proc.pid)
    assert victims
    os.kill(victims[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1, stderr
    assert "worker process died" in stderr and "re-run" in stderr
    assert not (out / "manifest.json").exists()  # nothing looks complete
    # a shard counts as finished once its progress record exists (its tar may be renamed a moment earlier)
    recorded = [p.name.removesuffix(".json") for p in progress.glob("*.json")]
    finished = {name: (out / name).stat().st_mtime_ns for name in recorded}
    assert 2 <= len(finished) < 200

    assert shard(src, out, *flags) == 0
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime  # finished shards were not redone
    assert not list(out.glob("*.tmp")) and not progress.exists()
    assert shard(src, tmp_path / "clean", *flags, "--workers", "1") == 0
    assert shard_files(out) == shard_files(tmp_path / "clean")
    assert main(["verify", str(out)]) == 0
    capsys.readouterr()
    assert shard(src, out, *flags) == 0  # finished: nothing is redone
    assert "2000 images in 200 shards" in capsys.readouterr().out
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in finished.items())
    # another plan into the same folder drops the stale manifest before rewriting any shard
    assert shard(src, out, "--samples-per-shard", "500") == 0
    assert read_manifest(str(out))["options"]["samples_per_shard"] == 500


def test_input_errors_exit_2_with_one_line(sample_dir: Path, tmp_path: Path, capsys) -> None:
    assert shard(tmp_path / "missing", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "missing") in err
    assert not (tmp_path / "out").exists()

    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert shard(sample_dir / "val", blocker / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(blocker / "out") in err

    assert main(["verify", str(tmp_path)]) == 2
    assert "manifest" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        shard(sample_dir / "val", tmp_path / "out", "--samples-per-shard", "0")
    assert exit_info.value.code == 2


def test_verify_names_flipped_byte_and_truncated_shard(sample_shards: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "copy"
    shutil.copytree(sample_shards, out)
    assert main(["verify", str(out)]) == 0
    # flip one byte inside the image of the 8th sample of shard 3, found through the .idx
    line = (out / "train-000003.idx").read_text().splitlines()[8].split()
    offset, key = int(line[1]) + int(line[2]) // 2, line[3].split(".")[0]
    data = bytearray((out / "train-000003.tar").read_bytes())
    data[offset] ^= 0x01
    (out / "train-000003.tar").write_bytes(bytes(data))
    # shard 5 cut where its 126th sample's header starts (a copy that stopped between two members)
    shard5 = (out / "train-000005.tar").read_bytes()
    cut = int((out / "train-000005.idx").read_text().splitlines()[126].split()[1]) - 512
    (out / "train-000005.tar").write_bytes(shard5[:cut])
    # and one byte of a member header in the middle of shard 6 (tarfile alone would just stop there)
    line = (out / "train-000006.idx").read_text().splitlines()[100].split()
    data = bytearray((out / "train-000006.tar").read_bytes())
    data[int(line[1]) - 512 + 10] ^= 0x01
    (out / "train-000006.tar").write_bytes(bytes(data))
    (out / "train-000007.idx").unlink()
    capsys.readouterr()

    assert main(["verify", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"train-000003.tar key {key}: image sha256" in err
    assert "train-000005.tar: tar truncated after key" in err
    assert "train-000006.tar: tar header damaged after key" in err
    assert "train-000006.tar: 99 samples, manifest says 250" in err
    assert "train-000007.tar: index train-000007.idx missing" in err
    assert not any(f"train-00000{i}" in err for i in (0, 1, 2, 4))
