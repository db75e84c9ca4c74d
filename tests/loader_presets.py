"""What the loader tests share: augmentation settings with known pixels in and out, a digest that
recognises an image across backends, and the batches of a loader over epochs."""

import hashlib

import torch

from pipeline.data import AugmentConfig

# Every random op off and a full-image crop: a view is the decoded image, normalised (32 px in, 32 px out).
IDENTITY = AugmentConfig(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_p=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=(0.0,),
    solarize_p=(0.0,),
)
PLAIN = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # no normalisation: views in [0, 1] pixel units


def pixel_digest(image: torch.Tensor) -> str:
    """Of the pixel values (views in [0, 1]); rounding absorbs float noise of the two normalisations."""
    return hashlib.sha1((image * 255).round().to(torch.uint8).contiguous().numpy().tobytes()).hexdigest()


def take_batches(loader, epochs, stop_after: int | None = None) -> list:
    """The loader's batches over `epochs` (set_epoch before each), stopping after `stop_after` in all."""
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        for batch in loader:
            out.append(batch)
            if len(out) == stop_after:
                return out
    return out
