"""DALI's blur and solarisation without conditionals (issue 24), in DALI's CPU mode (device_id=None): every
sample goes through both ops, with identity parameters where it was not selected. Unselected samples come
out unchanged, selected ones changed as the op says, and the selected fraction is about p."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from pipeline.data.dali import _augment
from pipeline.data.recipes import ViewSpec

pytest.importorskip("nvidia.dali")

BATCH, SIDE = 256, 32
# An identity view (whole-image crop at its own size, no flip, no colour), pixels out as 0..255 floats:
# only the op under test changes anything.
PLAIN = ViewSpec(
    size=SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, brightness=0.0, contrast=0.0,
    saturation=0.0, hue=0.0, grayscale_p=0.0, blur_p=0.0, blur_sigma=(1.0, 2.0), blur_kernel_frac=0.1,
    solarize_p=0.0, solarize_threshold=0.5, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255),
)  # fmt: skip


@pytest.fixture(scope="module")
def noise() -> np.ndarray:
    """(B, H, W, 3) uint8 noise: any blur or inversion changes every image."""
    return np.random.default_rng(0).integers(0, 256, (BATCH, SIDE, SIDE, 3), dtype=np.uint8)


def _run(images: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """`_augment` over `images` in a CPU-only DALI pipeline; (B, H, W, 3) float32 pixels in 0..255."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, seed=7)
    def graph():
        view = fn.external_source(source=lambda: list(images), batch=True, layout="HWC")
        return _augment(view, spec, float16=False, channels_last=True)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    return np.stack([np.asarray(x) for x in out])


def _roughness(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference of horizontal neighbours per image: what a blur lowers."""
    return np.abs(np.diff(images.astype(np.float64), axis=2)).mean((1, 2, 3))


def test_identity_view_is_exact(noise: np.ndarray) -> None:
    """The harness itself: with both ops off the pixels come back unchanged."""
    assert np.array_equal(_run(noise, PLAIN), noise.astype(np.float32))


def test_blur_leaves_unselected_samples_unchanged_and_smooths_the_selected(noise: np.ndarray) -> None:
    out = _run(noise, replace(PLAIN, blur_p=0.5))
    unchanged = (out == noise).all((1, 2, 3))
    assert 0.35 < unchanged.mean() < 0.65, unchanged.mean()  # p = 0.5 over 256 samples: +-0.1 is 3 sigma
    blurred = out[~unchanged]
    assert (_roughness(blurred) < 0.8 * _roughness(noise[~unchanged])).all()  # sigma >= 1 on noise


def test_solarisation_inverts_selected_samples_at_the_threshold_and_no_others(noise: np.ndarray) -> None:
    out = _run(noise, replace(PLAIN, solarize_p=0.3))
    solarised = np.where(noise >= 128, 255 - noise, noise).astype(np.float32)  # threshold 0.5 -> 128
    selected = (out == solarised).all((1, 2, 3))
    unchanged = (out == noise).all((1, 2, 3))
    assert (selected ^ unchanged).all()  # each sample exactly one of the two
    assert 0.2 < selected.mean() < 0.4, selected.mean()


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_probability_zero_and_one_are_exact(noise: np.ndarray, p: float) -> None:
    """p = 1 (BYOL's first view's blur): every sample blurred and solarised; p = 0 leaves the ops out."""
    out = _run(noise, replace(PLAIN, blur_p=p, solarize_p=p))
    changed = ~(out == noise).all((1, 2, 3))
    assert changed.all() if p == 1.0 else not changed.any()
