"""What the loader tests share: augmentation settings with known pixels in and out, a digest that
recognises an image across backends, the batches of a loader over epochs, and a damaged shard."""

import hashlib
import json
import shutil
from pathlib import Path

import torch

from pipeline.data import AugmentConfig
from pipeline.data.shards import load_shard_set

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


def damaged_first_shard(sample_shards: Path, out: Path, sample: int = 7) -> tuple[str, str]:
    """A copy of the first training shard (with its index and a one-shard manifest) in `out`, with
    zeros over the JPEG header and data of `sample`; returns (shard file name, that sample's key)."""
    manifest = json.loads((sample_shards / "manifest.json").read_text())
    first = manifest["splits"]["train"]["shards"][0]
    manifest["splits"] = {"train": {"shards": [first], "samples": first["samples"]}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    for name in (first["name"], first["index"]):
        shutil.copy(sample_shards / name, out / name)
    index = load_shard_set(str(out)).index(0)
    offset, size = index.image[sample]
    with open(out / first["name"], "r+b") as f:
        f.seek(int(offset))
        f.write(b"\x00" * int(size))
    return first["name"], index.keys[sample]
