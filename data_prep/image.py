"""Check one encoded image before it goes into a shard: a full decode, so truncated and corrupt files are
caught here rather than in the middle of a training epoch."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

# Stored as the original bytes; anything else would need re-encoding, which we do only on request.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}


class Rejected(Exception):
    """The file cannot be used; the message is the reason recorded in the manifest."""


@dataclass(frozen=True)
class CheckedImage:
    data: bytes  # what goes into the shard: the original bytes unless resized
    extension: str  # "jpg" | "png"
    width: int
    height: int


def check_image(data: bytes, resize_short: int | None = None) -> CheckedImage:
    """Decode `data` fully; with `resize_short`, shrink so the short side is that many pixels and
    re-encode in the same format (images already that small keep their original bytes)."""
    if not data:
        raise Rejected("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            if fmt not in EXTENSIONS:
                raise Rejected(f"unsupported image format {fmt} (only JPEG and PNG are stored as-is)")
            im.load()
            if resize_short is None or min(im.size) <= resize_short:
                return CheckedImage(data, EXTENSIONS[fmt], im.width, im.height)
            scale = resize_short / min(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            resized = im.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    except UnidentifiedImageError:
        raise Rejected("not an image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise Rejected(f"corrupt image: {e}") from None
    buf = io.BytesIO()
    if fmt == "JPEG":
        resized.save(buf, format="JPEG", quality=95)
    else:
        resized.save(buf, format="PNG")
    return CheckedImage(buf.getvalue(), EXTENSIONS[fmt], resized.width, resized.height)
