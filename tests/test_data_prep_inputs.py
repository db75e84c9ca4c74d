"""Inputs people already have: a parquet/CSV/TSV listing of paths with a label column (written by
pyarrow), a Hugging Face `datasets` folder (written by `save_to_disk`) and Hub-style parquet shards
with an image column (written by `to_parquet`); exit 1 when nothing was written; the progress line a
non-terminal gets."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from data_prep.__main__ import main
from data_prep.manifest import read_manifest

from shard_contents import shard_samples

REPO = Path(__file__).resolve().parent.parent


datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def val_images(sample_dir: Path) -> list[tuple[Path, str]]:
    """The 500 CIFAR val images and their class names."""
    return [(p, p.parent.name) for p in sorted((sample_dir / "val").rglob("*.jpg"))]


def test_parquet_csv_and_tsv_listings_give_the_folder_run_samples(
    val_images: list[tuple[Path, str]], sample_dir: Path, tmp_path: Path
) -> None:
    table = pa.table({"url": [str(p) for p, _ in val_images], "class": [c for _, c in val_images]})
    pq.write_table(table, tmp_path / "list.parquet", row_group_size=128)
    pcsv.write_csv(table, tmp_path / "list.csv")
    pcsv.write_csv(table, tmp_path / "list.tsv", pcsv.WriteOptions(delimiter="\t"))
    assert (
        main(["shard", str(sample_dir / "val"), str(tmp_path / "folder"), "--samples-per-shard", "100"]) == 0
    )
    classes = read_manifest(str(tmp_path / "folder"))["classes"]
    want = {str(p): (p.read_bytes(), classes.index(c)) for p, c in val_images}
    for listing in ("list.parquet", "list.csv", "list.tsv"):
        out = tmp_path / listing.replace(".", "-")
        argv = [
            "shard",
            str(tmp_path / listing),
            str(out),
            "--label-column",
            "class",
            "--samples-per-shard",
            "100",
        ]
        assert main(argv) == 0, listing
        assert read_manifest(str(out))["classes"] == classes
        assert shard_samples(out) == want, listing


def test_datasets_folder_and_hub_parquet_shards(val_images: list[tuple[Path, str]], tmp_path: Path) -> None:
    images = val_images[:120]
    names = sorted({c for _, c in val_images})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    embedded = [{"bytes": p.read_bytes(), "path": p.name} for p, _ in images]  # as the Hub stores them
    ds = datasets.Dataset.from_dict(
        {"image": embedded, "label": [names.index(c) for _, c in images]}, features=features
    )
    ds.save_to_disk(str(tmp_path / "hf"), max_shard_size="20KB")  # several .arrow files
    assert len(list((tmp_path / "hf").glob("*.arrow"))) > 1
    (tmp_path / "hub" / "data").mkdir(parents=True)
    for i in range(2):
        ds.shard(2, i, contiguous=True).to_parquet(
            str(tmp_path / "hub" / "data" / f"train-0000{i}-of-00002.parquet")
        )

    want = {p.read_bytes(): names.index(c) for p, c in images}
    for src in ("hf", "hub"):
        out = tmp_path / f"{src}-out"
        assert (
            main(["shard", str(tmp_path / src), str(out), "--samples-per-shard", "50", "--workers", "2"]) == 0
        )
        manifest = read_manifest(str(out))
        assert manifest["classes"] == names and manifest["total_samples"] == 120
        got = shard_samples(out)
        assert sorted(got.values()) == sorted(want.items())  # every image once, its label kept
    # rows keep their table order: the first shard holds the table's first 50 rows
    first = read_manifest(str(tmp_path / "hf-out"))["splits"]["train"]["shards"][0]
    with tarfile.open(tmp_path / "hf-out" / first["name"]) as tar:
        jpgs = [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]
    assert jpgs == [p.read_bytes() for p, _ in images[:50]]


def test_listing_refusals_and_nothing_written(tmp_path: Path, capsys) -> None:
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "nocol.parquet")
    assert main(["shard", str(tmp_path / "nocol.parquet"), str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "no image or path column" in err and "--path-column" in err and err.count("\n") == 1
    assert main(["shard", str(tmp_path / "nocol.parquet"), str(tmp_path / "o2"), "--path-column", "nme"]) == 2
    assert "--path-column 'nme': no such column (have name)" in capsys.readouterr().err

    # every listed file is not an image: exit 1, saying nothing was written
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_text("not an image")
    pq.write_table(
        pa.table({"path": [str(tmp_path / f"{i}.jpg") for i in range(3)]}), tmp_path / "bad.parquet"
    )
    assert main(["shard", str(tmp_path / "bad.parquet"), str(tmp_path / "o3")]) == 1
    assert "wrote nothing: all 3 images were rejected" in capsys.readouterr().err


def test_progress_lines_off_a_terminal(sample_dir: Path, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "data_prep", "shard", str(sample_dir / "val"), str(tmp_path / "out")]
    done = subprocess.run(
        [*cmd, "--samples-per-shard", "25", "--progress-every", "0.001"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("data_prep shard: ")]
    assert lines and all("images/s" in line and "rejected" in line and "ETA" in line for line in lines)
    assert "\r" not in done.stderr  # no bar redraws in a log


def test_integer_labels_in_a_csv_stay_integers(val_images: list[tuple[Path, str]], tmp_path: Path) -> None:
    """A label column of ints 0..11 gives classes "0".."11" with label i = class i (not text order, where
    "10" would sort before "2")."""
    rows = val_images[:120]
    table = pa.table({"path": [str(p) for p, _ in rows], "label": [i % 12 for i in range(len(rows))]})
    pcsv.write_csv(table, tmp_path / "list.csv")
    assert (
        main(["shard", str(tmp_path / "list.csv"), str(tmp_path / "out"), "--samples-per-shard", "60"]) == 0
    )
    assert read_manifest(str(tmp_path / "out"))["classes"] == [str(i) for i in range(12)]
    assert shard_samples(tmp_path / "out") == {
        str(p): (p.read_bytes(), i % 12) for i, (p, _) in enumerate(rows)
    }
