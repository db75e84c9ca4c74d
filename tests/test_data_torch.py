"""`torch` backend on the real sample shards: resident and streamed pixels, exact resume, rank split over
real gloo ranks, budget refusal, varied image sizes, damaged samples, and every method trained through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from pipeline.config import ConfigError
from pipeline.data import AugmentConfig, DataConfig, build_eval_loader, build_loader
from pipeline.methods import METHODS

from loader_presets import IDENTITY, PLAIN, damaged_first_shard, pixel_digest, take_batches
from ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]


def _cfg(shards, **kw) -> DataConfig:
    base = {"image_size": 32, "num_workers": 0, "batch_size": 50, "backend": "torch"}
    return DataConfig(train_shards=str(shards), **{**base, **kw})


def _truth(shards) -> dict[str, int]:
    out = {}
    for images, labels in build_eval_loader(str(shards), image_size=32, batch_size=500, **PLAIN):
        out.update({pixel_digest(x): int(y) for x, y in zip(images, labels, strict=True)})
    return out


def _same(a, b) -> bool:
    return torch.equal(a.labels, b.labels) and all(
        torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True)
    )


@pytest.mark.parametrize("source", ["resident", "stream"])
def test_random_ops_off_give_the_decoded_images_with_their_labels(sample_val_shards, source):
    truth = _truth(sample_val_shards)
    aug = AugmentConfig(**{**IDENTITY.__dict__, **PLAIN})
    loader = build_loader(_cfg(sample_val_shards, augment=aug, source=source))
    pairs = ((x, y) for batch in loader for x, y in zip(batch.views[1], batch.labels, strict=True))
    seen = [(pixel_digest(x), int(y)) for x, y in pairs]
    assert len(seen) == 500 and all(truth[key] == label for key, label in seen)
    assert sorted(key for key, _ in seen) == sorted(truth)  # the whole split, once each


def test_resident_and_streamed_pixels_give_identical_batches(sample_val_shards):
    batches = {
        source: list(build_loader(_cfg(sample_val_shards, recipe="byol", source=source), seed=3))
        for source in ("resident", "stream")
    }
    assert len(batches["resident"]) == 10
    assert all(_same(a, b) for a, b in zip(batches["resident"], batches["stream"], strict=True))


@pytest.mark.parametrize("source", ["resident", "stream"])
def test_restored_loader_yields_bit_identical_batches(sample_val_shards, source):
    cfg = _cfg(sample_val_shards, recipe="byol", source=source)  # 10 batches per epoch
    reference = take_batches(build_loader(cfg, seed=7), range(2), stop_after=13)
    interrupted = build_loader(cfg, seed=7)
    take_batches(interrupted, range(2), stop_after=7)
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint keeps
    assert (state["epoch"], state["batches_consumed"], state["backend"]) == (0, 7, "torch")
    resumed = build_loader(cfg, seed=7)
    resumed.load_state_dict(state)
    got = take_batches(resumed, range(state["epoch"], 2), stop_after=6)
    assert all(_same(a, b) for a, b in zip(reference[7:], got, strict=True))
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["batches_consumed"]) == (1, 3)
    assert not torch.equal(reference[0].views[0], reference[10].views[0])  # epochs differ


def _rank_reads(rank: int, world: int, shards: str, out: str) -> None:
    aug = AugmentConfig(**{**IDENTITY.__dict__, **PLAIN})
    loader = build_loader(_cfg(shards, batch_size=32, augment=aug), rank=dist.get_rank(), world_size=world)
    seen = [pixel_digest(x) for batch in loader for x in batch.views[0]]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, {"batches": len(loader), "seen": seen})
    if rank == 0:
        Path(out).write_text(json.dumps(everyone))


def test_two_gloo_ranks_read_disjoint_parts_in_equal_steps(sample_val_shards, tmp_path):
    out = tmp_path / "ranks.json"
    run_ranks(_rank_reads, 2, str(sample_val_shards), str(out))
    ranks = json.loads(out.read_text())
    assert [r["batches"] for r in ranks] == [7, 7]  # 500 // (2 x 32) steps on each rank
    assert [len(r["seen"]) for r in ranks] == [224, 224]
    assert not set(ranks[0]["seen"]) & set(ranks[1]["seen"])
    assert set(ranks[0]["seen"]) | set(ranks[1]["seen"]) <= set(_truth(sample_val_shards))


def test_a_split_over_the_budget_is_refused_in_one_line_or_streamed(sample_val_shards, caplog):
    with pytest.raises(ConfigError, match=r"data\.resident_budget_gib: .* data\.source=stream") as e:
        build_loader(_cfg(sample_val_shards, source="resident", resident_budget_gib=0.0005))
    assert "\n" not in str(e.value)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.torch_loader"):
        loader = build_loader(_cfg(sample_val_shards, resident_budget_gib=0.001))  # 1.5 MB decoded > 1 MiB
    assert loader.resident is None and "streaming instead" in caplog.text
    assert next(iter(loader)).views[0].shape == (50, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"data\.source=resident needs data\.backend=torch"):
        DataConfig(train_shards="x", source="resident")
    with pytest.raises(ConfigError, match=r"data\.resident_budget_gib must be > 0"):
        DataConfig(train_shards="x", backend="torch", resident_budget_gib=0)


@pytest.fixture(scope="module")
def varied_shards(tmp_path_factory) -> Path:
    """Flat-colour PNGs of 12 different sizes (value 200 + i): any blend with padding would show."""
    root = tmp_path_factory.mktemp("varied")
    (root / "src" / "flat").mkdir(parents=True)
    for i in range(48):
        h, w = 20 + 7 * (i % 12), 60 - 3 * (i % 12)
        Image.fromarray(np.full((h, w, 3), 200 + i % 12, np.uint8)).save(
            root / "src" / "flat" / f"{i:03d}.png"
        )
    argv = ["shard", str(root / "src"), str(root / "shards"), "--samples-per-shard", "16", "--workers", "1"]
    assert data_prep_main(argv) == 0
    return root / "shards"


@pytest.mark.parametrize("source", ["resident", "stream"])
def test_images_of_varied_sizes_are_cropped_inside_themselves(varied_shards, source):
    aug = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, **PLAIN)  # crops, flips, blur on
    loader = build_loader(
        _cfg(
            varied_shards, batch_size=24, recipe="multicrop", local_image_size=16, augment=aug, source=source
        )
    )
    for batch in loader:
        for view in batch.views:
            levels = view[:, 0].flatten(1) * 255  # every pixel of a view is its image's flat value
            assert (levels.amax(1) - levels.amin(1)).max() < 0.01 and levels.min() > 199.9


def test_damaged_sample_is_replaced_and_counted(sample_shards, tmp_path, caplog):
    shard_name, _ = damaged_first_shard(sample_shards, tmp_path)
    with caplog.at_level(logging.WARNING, logger="pipeline.data.samples"):
        loader = build_loader(_cfg(tmp_path, augment=IDENTITY))
    assert len(list(loader)) == 5 and loader.state_dict()["replaced_samples"] == 1
    assert f"{shard_name}:" in caplog.text and "data_prep verify" in caplog.text


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_on_multicrop_batches(method, sample_val_shards, tmp_path):
    from pipeline.train import main

    overrides = [
        f"data.train_shards={sample_val_shards}",
        f"run.output_dir={tmp_path}",
        "data.backend=torch",
        "data.recipe=multicrop",
        "data.local_crops=2",
        "data.local_image_size=16",
        "train.max_steps=2",
        "checkpoint.every_steps=null",
        "logging.progress_bar=false",
    ]
    try:
        assert (
            main(["--config", str(ROOT / "configs" / "debug.yaml"), f"method={{name: {method}}}", *overrides])
            == 0
        )
    finally:
        torch.use_deterministic_algorithms(False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("source", ["resident", "stream"])
def test_the_gpu_runs_the_same_augmentation(sample_val_shards, source):
    cfg = _cfg(sample_val_shards, recipe="byol", source=source)
    on_cpu = next(iter(build_loader(cfg, seed=2)))
    on_gpu = next(iter(build_loader(cfg, seed=2, device="cuda")))
    assert all(v.is_cuda for v in on_gpu.views) and on_gpu.labels.is_cuda
    assert torch.equal(on_cpu.labels, on_gpu.labels.cpu())
    for a, b in zip(on_cpu.views, on_gpu.views, strict=True):  # nvJPEG and libjpeg differ by a few levels
        assert (a - b.cpu()).abs().mean() < 0.05


def test_resident_eval_loader_matches_the_workers_and_decodes_once(sample_val_shards):
    def batches(**kw):
        return list(build_eval_loader(str(sample_val_shards), batch_size=64, rank=1, world_size=2, **kw))

    for size, resize in ((32, None), (24, 28)):
        plain = batches(image_size=size, resize_size=resize)
        resident = batches(image_size=size, resize_size=resize, resident_budget_gib=1.0)
        assert len(plain) == len(resident) == 4
        for (x, y), (rx, ry) in zip(plain, resident, strict=True):
            assert torch.equal(y, ry) and rx.shape == x.shape == (len(y), 3, size, size)
            error = (rx - x).abs()  # identical at 32 px; one resize filter against another at 24
            assert error.max() < 1e-5 if resize is None else error.mean() < 0.02
    from pipeline.data.eval import _resident_split

    hits = _resident_split.cache_info().hits
    batches(image_size=32, resident_budget_gib=1.0)
    assert _resident_split.cache_info().hits == hits + 1  # the split was not decoded again


def test_bench_loader_times_each_backend_after_a_warm_up(sample_val_shards):
    import argparse

    from bench.loader import measure, ratios

    args = argparse.Namespace(batch_size=50, workers=0, recipe="simclr", batches=3, warmup=1)
    rows = [
        measure(sample_val_shards, 32, backend, torch.device("cpu"), "resident", args)
        for backend in ("cpu", "torch")
    ]
    for row in rows:  # 1 + 3 batches of 50 from a 10-batch epoch
        assert (row["views"], row["batches"], row["warmup_batches"]) == (2, 3, 1)
        assert row["images_per_s"] == pytest.approx(150 / row["seconds"], rel=0.01)
    assert rows[1]["source"] == "resident" and "source" not in rows[0]
    assert set(ratios(rows)) == {"torch-resident@cpu/cpu@cpu"}


FEW_DESCRIPTORS = """
import resource, sys
import torch
from pipeline.data.reading import StoredBatches
from pipeline.data.resident import decode_resident
from pipeline.data.shards import load_shard_set
from pipeline.data.streaming import StreamingSource

resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
shards, cpu = load_shard_set(sys.argv[1]), torch.device("cpu")
resident = decode_resident(shards, device=cpu, budget_bytes=2**30, num_workers=2)
batches = StoredBatches(shards, 250, lag=10)
stream = StreamingSource(shards, batches, device=cpu, num_workers=2, prefetch=4, decode_on_device=True)
streamed = [(len(images), replaced) for images, _, _, replaced in stream]
print(len(resident.images), resident.replaced_samples, *map(sum, zip(*streamed, strict=True)))
"""


@pytest.mark.slow  # a fresh interpreter importing torch, and its loader workers
def test_decoding_holds_no_file_descriptor_per_image(sample_shards):
    """Each tensor a DataLoader worker returns holds a descriptor; with one per image, 2,000 images
    under a limit of 200 failed ("received 0 items of ancdata"), as 50,000 did on a GPU machine. The
    script also ends with its stream's workers alive, which must not hold up its exit."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", FEW_DESCRIPTORS, str(sample_shards), "200"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["2000", "0", "2000", "0"]  # every image, none "damaged" by EMFILE


def test_decoding_on_the_device_gives_the_workers_pixels(sample_val_shards):
    """The GPU's streaming path (workers read, `decode_jpeg` decodes each batch), run on the CPU."""
    from pipeline.data.reading import StoredBatches
    from pipeline.data.shards import load_shard_set
    from pipeline.data.streaming import StreamingSource

    shards = load_shard_set(str(sample_val_shards))
    sampler = StoredBatches(shards, 125)
    cpu = torch.device("cpu")
    paths = [
        list(StreamingSource(shards, sampler, device=cpu, num_workers=1, prefetch=2, decode_on_device=d))
        for d in (False, True)
    ]
    for (x, sizes, labels, replaced), (dx, dsizes, dlabels, dreplaced) in zip(*paths, strict=True):
        assert torch.equal(labels, dlabels) and torch.equal(sizes, dsizes) and replaced == dreplaced == 0
        assert (x.float() - dx.float()).abs().mean() < 0.5  # PIL and torchvision's libjpeg builds
