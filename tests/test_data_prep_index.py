"""`data_prep index`: WebDataset tars written by webdataset's own ShardWriter in img2dataset's layout
(key.jpg, key.txt, key.json; no .idx, no manifest) adopted as they are: the tars' bytes untouched, each
.idx what NVIDIA's wds2idx writes, a manifest naming the original tars, labels from a member, resume,
verify of foreign shards, and refusals in one line."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import fsspec
import numpy as np
import pytest
import webdataset as wds
from wds2idx import IndexCreator

from data_prep.__main__ import main
from data_prep.index import DamagedTar, _tarfile_members, build_index, iter_members
from data_prep.manifest import read_manifest, split_indexes, split_shards
from data_prep.shardspec import expand_shard_spec
from data_prep.sources import SourceError

SAMPLES_PER_TAR = 30
TARS = 3


def write_wds(folder: Path, sample_dir: Path, *, cls: bool = False, tars: int = TARS) -> list[Path]:
    """img2dataset's layout through webdataset.ShardWriter: `shards-00000{i}.tar`, 30 samples each."""
    folder.mkdir(parents=True, exist_ok=True)
    images = sorted((sample_dir / "train").rglob("*.jpg"))[:: 2000 // (SAMPLES_PER_TAR * tars)]
    classes = sorted(p.name for p in (sample_dir / "train").iterdir())
    with wds.ShardWriter(str(folder / "shards-%06d.tar"), maxcount=SAMPLES_PER_TAR, verbose=0) as sink:
        for n, image in enumerate(images[: SAMPLES_PER_TAR * tars]):
            sample = {
                "__key__": f"{n:09d}",
                "jpg": image.read_bytes(),
                "txt": f"a photo of a {image.parent.name}",
                "json": {"key": f"{n:09d}", "label": image.parent.name, "url": f"http://example.com/{n}.jpg"},
            }
            if cls:
                sample["cls"] = classes.index(image.parent.name)
            sink.write(sample)
    return sorted(folder.glob("*.tar"))


def digests(paths: list[Path]) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def wds_tars(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pristine folder of three ShardWriter tars; tests copy it before indexing in place."""
    folder = tmp_path_factory.mktemp("wds") / "pristine"
    write_wds(folder, sample_dir)
    return folder


def test_index_adopts_tars_in_place_without_rewriting_a_byte(wds_tars: Path, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(wds_tars, tmp_path / "wds")
    tars = sorted(folder.glob("*.tar"))
    before = digests(tars)
    pattern = str(folder / "shards-{000000..000002}.tar")

    assert main(["index", pattern, "--workers", "2", "--label-key", "json:label"]) == 0
    assert "90 samples in 3 tars" in capsys.readouterr().out
    assert digests(tars) == before  # no tar byte rewritten
    manifest = read_manifest(str(folder))
    assert manifest["label"] == {"member": "json", "field": "label"}
    names = {
        json.loads(data)["label"] for t in tars for k, data in _members(t).items() if k.endswith(".json")
    }
    assert manifest["classes"] == sorted(names) and len(names) > 1
    shards = manifest["splits"]["train"]["shards"]
    assert [s["name"] for s in shards] == [str(t) for t in tars]  # the original tars, absolute
    for entry, tar in zip(shards, tars, strict=True):
        assert entry["samples"] == SAMPLES_PER_TAR and entry["bytes"] == tar.stat().st_size
        assert "sha256" not in entry
        assert entry["index"] == str(tar.with_suffix(".idx"))
        with IndexCreator(str(tar), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert tar.with_suffix(".idx").read_text() == (tmp_path / "ref.idx").read_text()
    assert not (folder / ".data_prep-progress").exists()
    assert main(["verify", str(folder)]) == 0


def _members(tar: Path) -> dict[str, bytes]:
    with tarfile.open(tar) as t:
        return {m.name: t.extractfile(m).read() for m in t if m.isreg()}


def test_index_into_out_with_cls_labels_and_class_map(sample_dir: Path, tmp_path: Path, capsys) -> None:
    src = tmp_path / "src"
    tars = write_wds(src, sample_dir, cls=True, tars=2)
    classes = sorted(p.name for p in (sample_dir / "train").iterdir())
    (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    before = sorted(p.name for p in src.iterdir())
    out = tmp_path / "index"

    argv = [
        "index",
        str(src),
        "--out",
        str(out),
        "--label-key",
        "cls",
        "--classes",
        str(tmp_path / "classes.txt"),
    ]
    assert main(argv) == 0
    assert sorted(p.name for p in src.iterdir()) == before  # nothing written beside the tars
    manifest = read_manifest(str(out))
    assert manifest["classes"] == classes and manifest["label"] == {"member": "cls"}
    assert [s["index"] for s in manifest["splits"]["train"]["shards"]] == [
        str(out / t.with_suffix(".idx").name) for t in tars
    ]
    assert main(["verify", str(out)]) == 0

    # a label outside the class map is refused in one line, naming it; nothing published
    (tmp_path / "two.txt").write_text("airplane\nautomobile\n")
    capsys.readouterr()
    out2 = tmp_path / "index2"
    assert main([*argv[:3], str(out2), "--label-key", "cls", "--classes", str(tmp_path / "two.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not in --classes (2 classes)" in err
    assert not (out2 / "manifest.json").exists()


def test_index_resumes_reading_only_what_is_left(wds_tars: Path, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(wds_tars, tmp_path / "wds")
    good = (folder / "shards-000002.tar").read_bytes()
    (folder / "shards-000002.tar").write_bytes(good[:700])  # a damaged tar stops the first run
    assert main(["index", str(folder)]) == 2
    assert "shards-000002.tar" in capsys.readouterr().err
    assert not (folder / "manifest.json").exists()
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.idx")}
    assert sorted(stamps) == ["shards-000000.idx", "shards-000001.idx"]

    (folder / "shards-000002.tar").write_bytes(good)
    assert main(["index", str(folder)]) == 0
    assert "1 tars read" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.idx") if p.name in stamps} == stamps
    assert read_manifest(str(folder))["total_samples"] == 3 * SAMPLES_PER_TAR


def test_verify_checks_foreign_shards_for_what_they_have(wds_tars: Path, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(wds_tars, tmp_path / "wds")
    assert main(["index", str(folder), "--label-key", "json:label"]) == 0
    line = (folder / "shards-000001.idx").read_text().splitlines()[5].split()
    data = bytearray((folder / "shards-000001.tar").read_bytes())
    offset = int(line[1])  # the image's first bytes: the JPEG header no longer parses
    data[offset : offset + 16] = bytes(16)
    (folder / "shards-000001.tar").write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["verify", str(folder)]) == 1
    err = capsys.readouterr().err
    key = line[3].split(".")[0]
    assert f"shards-000001.tar key {key}: image does not decode" in err and err.count("\n") == 1


def test_refusals_are_one_line_and_write_nothing(wds_tars: Path, tmp_path: Path, capsys) -> None:
    folder = shutil.copytree(wds_tars, tmp_path / "wds")
    cases = [
        (["index", str(folder / "shards-{000000..000004}.tar")], "tar not found"),
        (["index", str(folder), "--label-key", "cls"], "has no .cls member"),
        (["index", str(folder), "--label-key", "json:nope"], "has no field 'nope'"),
        (["index", str(tmp_path / "nowhere")], "shard spec"),
        (["shard", str(folder), str(tmp_path / "out")], "python -m data_prep index"),
        (["shard", str(folder / "shards-000000.tar"), str(tmp_path / "out")], "python -m data_prep index"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
        assert not list(folder.glob("*.idx")) and not (folder / "manifest.json").exists()
    with pytest.raises(SystemExit) as exit_info:
        main(["index", str(folder), "--label-key", "txt"])
    assert exit_info.value.code == 2


def test_expand_shard_spec(tmp_path: Path) -> None:
    # patterns and explicit tars are expanded without touching the store: this bucket does not exist
    assert expand_shard_spec("s3://no-such-bucket/x-{000008..000011}.tar") == [
        f"s3://no-such-bucket/x-{i:06d}.tar" for i in range(8, 12)
    ]
    assert expand_shard_spec("s3://b/a.tar,s3://b/{c,d}-{0..1}.tar") == [
        "s3://b/a.tar", "s3://b/c-0.tar", "s3://b/c-1.tar", "s3://b/d-0.tar", "s3://b/d-1.tar",
    ]  # fmt: skip
    assert expand_shard_spec(["rel/a.tar", "/abs/b.tar"]) == [os.path.abspath("rel/a.tar"), "/abs/b.tar"]
    for name in ("b.tar", "a.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert expand_shard_spec(str(tmp_path)) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    for bad, message in [
        ("s3://b/x-{0..3.tar", "unbalanced"),
        ("s3://b/a.tar,s3://b/a.tar", "twice"),
        ("", "empty shard spec"),
        (str(tmp_path / "empty-{0..1}"), "neither"),
    ]:
        with pytest.raises(SourceError, match=message):
            expand_shard_spec(bad)


def test_index_on_s3_in_place_and_into_a_local_out(s3_server, wds_tars: Path, tmp_path: Path) -> None:
    s3_server.make_bucket("wds-bucket")
    fs = fsspec.filesystem("s3")
    for tar in sorted(wds_tars.glob("*.tar")):
        fs.put_file(str(tar), f"wds-bucket/laion/{tar.name}")
    before = {p: fs.info(p)["ETag"] for p in fs.find("wds-bucket/laion")}

    out = tmp_path / "index"
    assert main(["index", "s3://wds-bucket/laion/shards-{000000..000002}.tar", "--out", str(out)]) == 0
    manifest = read_manifest(str(out))
    assert [s["name"] for s in manifest["splits"]["train"]["shards"]] == [
        f"s3://wds-bucket/laion/shards-{i:06d}.tar" for i in range(3)
    ]
    assert main(["verify", str(out)]) == 0

    assert main(["index", "s3://wds-bucket/laion", "--workers", "2"]) == 0  # .idx beside the tars
    fs.invalidate_cache()
    assert {p: fs.info(p)["ETag"] for p in fs.find("wds-bucket/laion") if p.endswith(".tar")} == before
    assert (
        fs.cat_file("wds-bucket/laion/shards-000001.idx").decode() == (out / "shards-000001.idx").read_text()
    )
    assert main(["verify", "s3://wds-bucket/laion"]) == 0


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_header_scan_matches_tarfile_for_every_tar_format(fmt: int, tmp_path: Path) -> None:
    """Long member names are stored as a ustar prefix, a GNU long-name record or a pax record; the
    header-only scan must find each member's data where tarfile does. wds2idx (GNU tar's --block-number)
    agrees except for GNU long names, where it points at the long-name record instead of the data."""
    path = tmp_path / "t.tar"
    deep = "d" * 60 + "/" + "e" * 60  # 121 chars: needs the prefix field, a GNU or a pax record
    with tarfile.open(path, "w", format=fmt) as tar:
        for i, key in enumerate(("a", f"{deep}/b", "c")):
            for ext, size in (("jpg", 700), ("json", 3)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = size, 1.5 if fmt == tarfile.PAX_FORMAT else 1
                tar.addfile(info, io.BytesIO(bytes([i + 1]) * size))
    with open(path, "rb") as f:
        index = build_index(f)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        contents = {m.name: tar.extractfile(m).read() for m in tar}
    for line in index.splitlines()[1:]:
        fields = line.split()
        for ext, offset, size, name in zip(*[iter(fields)] * 4, strict=True):
            assert name.endswith(ext) and data[int(offset) : int(offset) + int(size)] == contents[name]
    if fmt != tarfile.GNU_FORMAT:
        with IndexCreator(str(path), str(tmp_path / "ref.idx"), verbose=False) as creator:
            creator.create_index()
        assert index == (tmp_path / "ref.idx").read_text()
    with open(path, "rb") as f, open(path, "rb") as g:
        members = list(iter_members(f))
        assert members == list(_tarfile_members(g))
    data = path.read_bytes()
    (_, first, first_size, _), (_, second, _, _) = members[:2]
    with pytest.raises(DamagedTar, match="cut off"):
        build_index(io.BytesIO(data[: first + first_size // 2]))
    with pytest.raises(DamagedTar, match="no tar header at byte"):
        build_index(io.BytesIO(data[: second - 400]))
    corrupt = bytearray(data)
    corrupt[second - 512 + 5] ^= 0x20  # a name byte of the second member's header
    with pytest.raises(DamagedTar, match="checksum"):
        build_index(io.BytesIO(bytes(corrupt)))


def test_dali_reads_adopted_tars_through_their_index(wds_tars: Path, tmp_path: Path) -> None:
    """The offsets are right where it matters: DALI's reader (CPU pipeline) returns every image of
    webdataset's own pax tars byte for byte, through .idx files written under --out."""
    from nvidia.dali import fn, pipeline_def

    out = tmp_path / "index"
    assert main(["index", str(wds_tars), "--out", str(out)]) == 0
    want = {}
    for tar in sorted(wds_tars.glob("*.tar")):
        members = _members(tar)
        want.update({json.loads(members[f"{k}.json"])["key"]: members[f"{k}.jpg"] for k in
                     {n.split(".")[0] for n in members}})  # fmt: skip

    @pipeline_def(batch_size=SAMPLES_PER_TAR, num_threads=1, device_id=None)
    def reader_pipeline():
        image, meta = fn.readers.webdataset(
            paths=split_shards(str(out), "train"),
            index_paths=split_indexes(str(out), "train"),
            ext=["jpg", "json"],
            missing_component_behavior="error",
            name="reader",
        )
        return image, meta

    pipe = reader_pipeline()
    pipe.build()
    assert pipe.epoch_size("reader") == len(want) == TARS * SAMPLES_PER_TAR
    got = {}
    for _ in range(TARS):
        images, metas = pipe.run()
        for i in range(len(metas)):
            got[json.loads(np.asarray(metas.at(i)).tobytes())["key"]] = np.asarray(images.at(i)).tobytes()
    assert got == want
