"""Reading at scale: whole shards per rank from object storage, start-up that reads no index, and the
shard locations training accepts (tars with their indexes, brace patterns, lists, absolute manifests).

Against the moto S3 server on loopback, with the bytes each GET returned counted at the server's side
of fsspec (`fs.cat_file` is what the reader calls; we count by wrapping the filesystem's method).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import fsspec
import pytest
import torch

from pipeline.data import DataConfig, build_eval_loader, build_loader
from pipeline.data.shards import load_shard_set
from pipeline.schema import ConfigError

from loader_presets import IDENTITY


def _cfg(shards: str, **kw) -> DataConfig:
    base = {"train_shards": shards, "batch_size": 50, "num_workers": 0, "image_size": 32, "recipe": "simclr"}
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def s3_val(s3_server, sample_val_shards: Path) -> str:
    bucket = s3_server.make_bucket("reading")
    s3_server.filesystem().put(str(sample_val_shards), f"{bucket}/val", recursive=True)
    return f"{bucket}/val"


class CountingGets:
    """Counts ranged GETs and their bytes made through s3fs while active."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import s3fs

        self.requests, self.bytes = 0, 0
        original = s3fs.S3FileSystem.cat_file

        def counted(fs, path, *args, **kwargs):
            data = original(fs, path, *args, **kwargs)
            self.requests += 1
            self.bytes += len(data)
            return data

        monkeypatch.setattr(s3fs.S3FileSystem, "cat_file", counted)


@pytest.mark.parametrize("world_size", [1, 2])
def test_ranks_read_each_shard_byte_about_once_in_few_requests(
    s3_val, sample_val_shards, monkeypatch, world_size
):
    gets = CountingGets(monkeypatch)
    stage = tempfile.mkdtemp()
    labels = []
    for rank in range(world_size):
        cfg = _cfg(s3_val, batch_size=25, augment=IDENTITY, stage_dir=stage, shuffle_buffer=128)
        loader = build_loader(cfg, rank=rank, world_size=world_size)
        labels += [b.labels for b in loader]
        loader._batches.reader.close()
    shard_bytes = sum(p.stat().st_size for p in sample_val_shards.glob("*.tar"))
    assert len(torch.cat(labels)) == 500 // (25 * world_size) * 25 * world_size
    assert gets.bytes <= 1.05 * shard_bytes  # every byte about once, summed over the ranks
    samples = len(torch.cat(labels))
    assert gets.requests / samples <= 0.02 * 1.5  # windows of 128 from 250-sample shards: ~one GET per 60
    assert os.listdir(stage) == []  # every staged window removed


def test_staged_windows_equal_local_reads_and_leave_no_files(s3_val, sample_val_shards):
    stage = tempfile.mkdtemp()
    remote = build_loader(_cfg(s3_val, augment=IDENTITY, stage_dir=stage, num_workers=1), seed=3)
    local = build_loader(_cfg(str(sample_val_shards), augment=IDENTITY, num_workers=1), seed=3)
    for a, b in zip(remote, local, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.views[0], b.views[0])
    reader = remote._batches.reader
    del remote
    reader.close()
    assert os.listdir(stage) == []
    images, _ = next(iter(build_eval_loader(s3_val, image_size=32, batch_size=10)))
    expected, _ = next(iter(build_eval_loader(str(sample_val_shards), image_size=32, batch_size=10)))
    assert torch.equal(images, expected)


def test_start_up_reads_the_manifest_only(sample_val_shards, tmp_path):
    """No `.idx` is parsed to build a loader: a missing one surfaces when a reader reaches its shard."""
    copy = tmp_path / "shards"
    shutil.copytree(sample_val_shards, copy)
    last = sorted(copy.glob("*.idx"))[-1]
    last.unlink()
    shards = load_shard_set(str(copy))
    assert shards.num_samples == 500 and shards.shard_sizes == (250, 250)
    loader = build_loader(_cfg(str(copy)))
    assert len(loader) == 10
    with pytest.raises(Exception, match=last.name):
        list(loader)


def test_tars_with_their_indexes_train_without_a_manifest(sample_val_shards, tmp_path):
    tars = sorted(sample_val_shards.glob("train-*.tar"))
    one = load_shard_set(str(tars[0]))
    assert one.num_samples == 250 and not one.labelled
    pattern = str(sample_val_shards / "train-{000000..000001}.tar")
    both = load_shard_set(pattern)
    assert both.shard_urls == tuple(str(t) for t in tars) and both.num_samples == 500
    listed = load_shard_set(",".join(str(t) for t in tars))
    assert listed.shard_urls == both.shard_urls
    batches = list(build_loader(_cfg(pattern, augment=IDENTITY)))
    assert len(batches) == 10 and batches[0].labels is None

    lonely = tmp_path / "lonely.tar"
    shutil.copy(tars[0], lonely)
    with pytest.raises(ConfigError, match=r"lonely\.idx.*data_prep index") as refused:
        load_shard_set(str(lonely))
    assert "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match="mixes"):
        load_shard_set(f"{sample_val_shards},{tars[0]}")


def test_a_manifest_may_point_at_shards_elsewhere_with_json_labels(sample_val_shards, tmp_path):
    """What `data_prep index` writes for tars it did not make: absolute URLs, labels from a JSON field."""
    manifest = json.loads((sample_val_shards / "manifest.json").read_text())
    for entry in manifest["splits"]["train"]["shards"]:
        entry["name"] = str(sample_val_shards / entry["name"])
        entry["index"] = str(sample_val_shards / entry["index"])
        entry.pop("sha256", None)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    absolute = build_loader(_cfg(str(tmp_path), augment=IDENTITY), seed=1)
    original = build_loader(_cfg(str(sample_val_shards), augment=IDENTITY), seed=1)
    for a, b in zip(absolute, original, strict=True):
        assert torch.equal(a.labels, b.labels) and torch.equal(a.views[0], b.views[0])

    manifest["label"] = {"member": "json", "field": "class_name"}  # data_prep's .json has no such field
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with fsspec.open(manifest["splits"]["train"]["shards"][0]["index"], "rt") as f:
        assert " json " in f.read()  # the member exists; its field does not: every sample is unreadable
    with pytest.raises(Exception, match="no readable sample"):
        next(iter(build_loader(_cfg(str(tmp_path)))))


def test_two_folders_train_as_one_split(sample_val_shards):
    joined = load_shard_set(f"{sample_val_shards},{sample_val_shards}")
    assert joined.num_samples == 1000 and len(joined.shard_urls) == 4 and joined.labelled
    assert len(build_loader(_cfg(f"{sample_val_shards},{sample_val_shards}"))) == 20
