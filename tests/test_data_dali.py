"""DALI backend in CPU-only mode (device_id=None), and agreement of the three backends (cpu, dali,
torch) on one recipe: identical pixels with the random ops off, alike crop and colour statistics."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_prep.__main__ import main as data_prep_main
from pipeline.data import AugmentConfig, DataConfig, build_eval_loader, build_loader

from loader_presets import IDENTITY, PLAIN, damaged_first_shard, pixel_digest

REPO = Path(__file__).resolve().parent.parent


def _cfg(shards, **kw) -> DataConfig:
    base = {"image_size": 32, "num_workers": 1, "batch_size": 50, "backend": "dali"}
    return DataConfig(train_shards=str(shards), **{**base, **kw})


@pytest.mark.parametrize("backend", ["dali", "cpu", "torch"])
def test_multicrop_views_shapes_dtypes_ranges(sample_shards, backend):
    cfg = _cfg(
        sample_shards,
        backend=backend,
        num_workers=1 if backend == "dali" else 0,
        recipe="multicrop",
        local_crops=3,
        local_image_size=16,
        dtype="float16",
    )
    loader = build_loader(cfg, memory_format=torch.channels_last)
    batch = next(iter(loader))
    assert [tuple(v.shape) for v in batch.views] == [(50, 3, 32, 32)] * 2 + [(50, 3, 16, 16)] * 3
    assert all(
        v.dtype == torch.float16 and v.is_contiguous(memory_format=torch.channels_last) for v in batch.views
    )
    for v in batch.views:  # ImageNet-normalised pixels of [0, 1]
        assert v.min() >= -2.2 and v.max() <= 2.7 and v.float().std() > 0.3
    assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= set(range(10))
    assert all(not torch.equal(a, b) for a, b in zip(batch.views[0], batch.views[1], strict=True))
    assert len(loader) == 40


def test_two_ranks_read_disjoint_halves_with_labels_and_match_the_cpu_decode(sample_val_shards):
    # every random op off except solarisation with p=1: DALI's output must equal torchvision's, exactly
    truth = {}
    for images, labels in build_eval_loader(str(sample_val_shards), image_size=32, batch_size=500, **PLAIN):
        solarised = torch.where(images >= 128 / 255 - 1e-6, 1.0 - images, images)
        truth.update({pixel_digest(x): int(y) for x, y in zip(solarised, labels, strict=True)})
    aug = AugmentConfig(**{**IDENTITY.__dict__, "solarize_p": (1.0,), **PLAIN})
    for backend in ("cpu", "torch"):
        batch = next(iter(build_loader(_cfg(sample_val_shards, augment=aug, backend=backend, num_workers=0))))
        assert all(pixel_digest(x) in truth for x in batch.views[0])
    seen = []
    for rank in range(2):
        loader = build_loader(_cfg(sample_val_shards, augment=aug, batch_size=50), rank=rank, world_size=2)
        rank_seen = []
        for batch in loader:
            for image, label in zip(batch.views[0], batch.labels, strict=True):
                key = pixel_digest(image)
                assert truth[key] == int(label)
                rank_seen.append(key)
        seen.append(rank_seen)
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(truth)


def test_resume_restores_position_and_dali_state(sample_val_shards):
    cfg = _cfg(sample_val_shards, recipe="byol")
    reference = []
    for batch in build_loader(cfg, seed=5):
        reference.append(batch)
        if len(reference) == 6:
            break
    interrupted = build_loader(cfg, seed=5)
    for i, _ in enumerate(interrupted):
        if i == 2:
            break
    state = interrupted.state_dict()
    assert (state["epoch"], state["batches_consumed"], state["backend"]) == (0, 3, "dali")
    resumed = build_loader(cfg, seed=5)
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(3), resumed, strict=False)]
    assert resumed.state_dict()["batches_consumed"] == 6
    for ref, new in zip(reference[3:], got, strict=True):
        assert torch.equal(ref.labels, new.labels)
        assert all(torch.equal(a, b) for a, b in zip(ref.views, new.views, strict=True))


def test_unlabelled_shards_give_no_labels(sample_dir, tmp_path):
    argv = ["shard", str(sample_dir / "val"), str(tmp_path), "--labels", "none", "--samples-per-shard", "250"]
    assert data_prep_main([*argv, "--workers", "1"]) == 0
    for backend in ("cpu", "dali"):
        batch = next(iter(build_loader(_cfg(tmp_path, backend=backend))))
        assert batch.labels is None and batch.views[0].shape == (50, 3, 32, 32)


@pytest.fixture(scope="module")
def gradient_shards(tmp_path_factory) -> Path:
    """64x64 PNGs with R = 4x and G = 4y: a view's R and G ranges measure its crop's width and height."""
    root = tmp_path_factory.mktemp("gradient")
    (root / "src" / "ramp").mkdir(parents=True)
    y, x = np.mgrid[0:64, 0:64]
    for i in range(200):
        pixels = np.stack([4 * x, 4 * y, np.full_like(x, i)], axis=-1).astype(np.uint8)
        Image.fromarray(pixels).save(root / "src" / "ramp" / f"{i:03d}.png")
    argv = ["shard", str(root / "src"), str(root / "shards"), "--samples-per-shard", "100", "--workers", "1"]
    assert data_prep_main(argv) == 0
    return root / "shards"


def _crop_stats(shards, backend):
    aug = AugmentConfig(jitter_p=0.0, grayscale_p=0.0, blur_p=(0.0,), **PLAIN)
    batch = next(iter(build_loader(_cfg(shards, backend=backend, batch_size=200, augment=aug), seed=1)))
    views = torch.cat(batch.views).float()  # (400, 3, 32, 32)
    width = (views[:, 0].amax((1, 2)) - views[:, 0].amin((1, 2))) / (252 / 255)
    height = (views[:, 1].amax((1, 2)) - views[:, 1].amin((1, 2))) / (252 / 255)
    return (width * height).numpy(), (width / height).numpy()


def test_every_backend_crops_alike(gradient_shards):
    stats = {b: _crop_stats(gradient_shards, b) for b in ("cpu", "dali", "torch")}
    for area, ratio in stats.values():  # scale (0.08, 1), ratio (3/4, 4/3); edges shrink ranges ~3%
        assert 0.4 < area.mean() < 0.65 and area.min() > 0.05 and area.max() <= 1.0
        assert np.quantile(ratio, 0.02) > 0.7 and np.quantile(ratio, 0.98) < 1.45
    for other in ("dali", "torch"):
        assert abs(stats["cpu"][0].mean() - stats[other][0].mean()) < 0.06
        assert abs(np.median(stats["cpu"][1]) - np.median(stats[other][1])) < 0.08
        assert abs(np.quantile(stats["cpu"][0], 0.1) - np.quantile(stats[other][0], 0.1)) < 0.06


def _colour_stats(shards, backend):
    cfg = _cfg(shards, backend=backend, batch_size=250, augment=AugmentConfig(**PLAIN))
    batch = next(iter(build_loader(cfg, seed=1)))
    views = torch.cat(batch.views).float()  # (500, 3, 32, 32), SimCLR colour strength 1.0
    spread = (views.amax(1) - views.amin(1)).amax((1, 2))  # 0 for a greyscale view
    return {
        "grey": (spread < 0.02).float().mean().item(),
        "brightness": views.mean((1, 2, 3)).mean().item(),
        "contrast": views.std((1, 2, 3)).mean().item(),
        "chroma": (views - views.mean(1, keepdim=True)).abs().mean().item(),
    }


def test_every_backend_colours_alike(sample_shards):
    cpu = _colour_stats(sample_shards, "cpu")
    for other in (_colour_stats(sample_shards, "dali"), _colour_stats(sample_shards, "torch")):
        for s in (cpu, other):
            assert 0.1 < s["grey"] < 0.35  # grayscale p = 0.2 (plus saturation jitter near 0)
        assert abs(cpu["grey"] - other["grey"]) < 0.1
        assert abs(cpu["brightness"] - other["brightness"]) < 0.05
        assert abs(cpu["contrast"] - other["contrast"]) / cpu["contrast"] < 0.2
        assert abs(cpu["chroma"] - other["chroma"]) / cpu["chroma"] < 0.25


@pytest.mark.slow  # a fresh interpreter importing torch and DALI
def test_damaged_sample_fails_naming_shard_and_key(sample_shards, tmp_path):
    shard_name, damaged_key = damaged_first_shard(sample_shards, tmp_path)
    # In a subprocess: DALI's CPU decoder itself may crash on some damaged JPEGs; the suite must survive that.
    script = textwrap.dedent(f"""
        from pipeline.data import DataConfig, build_loader
        cfg = DataConfig(train_shards={str(tmp_path)!r}, backend="dali", image_size=32, batch_size=50)
        for _ in build_loader(cfg):
            pass
    """)
    run = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    if run.returncode == -signal.SIGSEGV:  # seen in about half the runs on DALI 2.4's CPU decoder error path
        pytest.xfail("DALI 2.4's host image decoder crashed (SIGSEGV) on the damaged JPEG instead of raising")
    assert run.returncode == 1, run.stderr[-2000:]
    assert f"{shard_name}:{damaged_key}" in run.stderr and "data_prep verify" in run.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mixed_decode_on_the_gpu(sample_shards):
    batch = next(
        iter(build_loader(_cfg(sample_shards, recipe="multicrop", local_image_size=16), device="cuda"))
    )
    assert len(batch.views) == 8 and all(v.is_cuda and v.dtype == torch.float32 for v in batch.views)
    assert batch.views[2].shape == (50, 3, 16, 16) and batch.labels.is_cuda
