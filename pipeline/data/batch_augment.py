"""A recipe's views for a whole batch at once: plain torch ops, per-sample random parameters.

The same code runs on the CPU and on the GPU. Every random parameter (a few numbers per sample) is
drawn on the host from the caller's numpy `Generator` and moved to the pixels' device in one copy, so a
batch depends only on the generator's seed, never on the device.

Semantics follow the CPU backend's torchvision ops (`cpu.view_transform`), one `ViewSpec` per view:
random resized crop (torchvision's area / log-ratio sampling, 10 tries, centre fallback) with its
antialiased bilinear resize, flip, colour jitter with probability, grayscale, Gaussian blur with
per-sample sigma and reflect padding, solarisation, normalisation. Colour jitter is one affine colour map
per sample (brightness, contrast, saturation, and hue as a rotation in YIQ, as DALI's `color_twist`),
composed in one random order per batch and clamped once.

Why it is fast: a sample's crop + resize + flip is two small matrices (rows, columns), its colour jitter
one 3 x 3 map and its blur a depthwise convolution, so a batch is a few batched kernels; views of one
size are stacked and augmented together. Every op runs on every sample, with identity parameters where
a sample was not selected: no data-dependent shapes and no host syncs, a short fixed list of kernels.

Images arrive as a uint8 batch padded to a common size with their true sizes beside them (a resident
corpus or a decoded batch of varied sizes); crops stay inside each image's own size.
"""

from __future__ import annotations

import math
from itertools import groupby

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.data.recipes import ViewSpec

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114])  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
YIQ_TO_RGB = np.linalg.inv(RGB_TO_YIQ)
CROP_TRIES = 10  # torchvision's RandomResizedCrop.get_params


def pad_images(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """[(3, h_i, w_i) uint8] -> ((B, 3, H, W) uint8, zero-padded bottom and right; (B, 2) sizes (h, w))."""
    sizes = torch.tensor([tuple(x.shape[1:]) for x in images], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(0).values)
    out = images[0].new_zeros((len(images), 3, height, width))
    for n, x in enumerate(images):
        out[n, :, : x.shape[1], : x.shape[2]] = x
    return out, sizes


# ------------------------------------------------------------------------- random parameters (host, numpy)


def crop_boxes(sizes: np.ndarray, spec: ViewSpec, rng: np.random.Generator) -> np.ndarray:
    """(B, 2) image sizes (h, w) -> (B, 4) crops (top, left, height, width), torchvision's sampling."""
    height, width = sizes[:, :1].astype(np.float64), sizes[:, 1:].astype(np.float64)
    area = height * width * rng.uniform(*spec.scale, size=(len(sizes), CROP_TRIES))
    ratio = np.exp(rng.uniform(math.log(spec.ratio[0]), math.log(spec.ratio[1]), size=area.shape))
    w, h = np.round(np.sqrt(area * ratio)), np.round(np.sqrt(area / ratio))
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    first = fits.argmax(1)[:, None]  # the first try that fits
    w, h = np.take_along_axis(w, first, 1)[:, 0], np.take_along_axis(h, first, 1)[:, 0]
    height, width = height[:, 0], width[:, 0]
    # No try fits: the whole image, cut to the ratio range, centred (torchvision's fallback).
    aspect = width / height
    fallback_w = np.where(aspect > spec.ratio[1], np.round(height * spec.ratio[1]), width)
    fallback_h = np.where(aspect < spec.ratio[0], np.round(width / spec.ratio[0]), height)
    ok = fits.any(1)
    w, h = np.where(ok, w, fallback_w), np.where(ok, h, fallback_h)
    u = rng.random((len(sizes), 2))
    top = np.where(ok, np.floor(u[:, 0] * (height - h + 1)), np.round((height - h) / 2))
    left = np.where(ok, np.floor(u[:, 1] * (width - w + 1)), np.round((width - w) / 2))
    return np.stack([top, left, h, w], 1)


def colour_maps(
    spec: ViewSpec, selected: np.ndarray, order: list[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Colour jitter of each sample as x -> M x + U m + v, m = the image's mean RGB: (B, 3, 3) x 3 + (B, 3).

    torchvision's ranges (factor ~ U[max(0, 1 - s), 1 + s], hue ~ U[-h, h] turns), applied in `order`
    (0 brightness, 1 contrast: towards the image's mean grey level, 2 saturation: towards its grey image,
    3 hue); unselected samples get the identity.
    """
    batch = len(selected)

    def factors(strength: float) -> np.ndarray:
        f = rng.uniform(max(0.0, 1 - strength), 1 + strength, size=batch)
        return np.where(selected, f, 1.0)[:, None, None]

    brightness, contrast, saturation = (factors(s) for s in (spec.brightness, spec.contrast, spec.saturation))
    angle = np.where(selected, rng.uniform(-spec.hue, spec.hue, size=batch), 0.0) * 2 * math.pi
    rotation = np.zeros((batch, 3, 3))
    rotation[:, 0, 0], rotation[:, 1, 1], rotation[:, 2, 2] = 1, np.cos(angle), np.cos(angle)
    rotation[:, 1, 2], rotation[:, 2, 1] = -np.sin(angle), np.sin(angle)
    hue = YIQ_TO_RGB @ rotation @ RGB_TO_YIQ
    eye, grey_rows = np.eye(3), np.tile(GREY_WEIGHTS, (3, 1))
    matrix, mean_term, offset = np.tile(eye, (batch, 1, 1)), np.zeros((batch, 3, 3)), np.zeros((batch, 3, 1))
    for op in order:
        if op == 0:
            step = brightness * eye
        elif op == 1:  # c x + (1 - c) grey_level(x); the level of the current image is linear in m
            step = contrast * eye
            mean_term = contrast * mean_term + (1 - contrast) * grey_rows @ (matrix + mean_term)
            offset = contrast * offset + (1 - contrast) * grey_rows @ offset
            matrix = step @ matrix
            continue
        elif op == 2:
            step = saturation * eye + (1 - saturation) * grey_rows
        else:
            step = hue
        matrix, mean_term, offset = step @ matrix, step @ mean_term, step @ offset
    return matrix, mean_term, offset[:, :, 0]


def blur_taps(spec: ViewSpec, selected: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, k) Gaussian taps, sigma ~ U[blur_sigma] per sample; a unit tap (no blur) where not selected."""
    half = spec.blur_kernel // 2
    sigma = rng.uniform(*spec.blur_sigma, size=len(selected))[:, None]
    taps = np.exp(-0.5 * (np.arange(-half, half + 1) / sigma) ** 2)
    unit = (np.arange(-half, half + 1) == 0).astype(np.float64)
    return np.where(selected[:, None], taps / taps.sum(1, keepdims=True), unit)


def view_params(spec: ViewSpec, sizes: np.ndarray, order: list[int], rng: np.random.Generator) -> np.ndarray:
    """Every random choice of one view for a batch, packed (B, 34 + k) for one host-to-device copy:
    crop (4), flip (1), colour M, U (9 + 9), v (3), grey (1), solarise (1), scale (3), shift (3),
    blur taps (k, at the end)."""
    batch = len(sizes)
    crop = crop_boxes(sizes, spec, rng)
    flip = rng.random(batch) < spec.flip_p
    matrix, mean_term, offset = colour_maps(spec, rng.random(batch) < spec.jitter_p, order, rng)
    grey = rng.random(batch) < spec.grayscale_p
    taps = blur_taps(spec, rng.random(batch) < spec.blur_p, rng)
    solarize = rng.random(batch) < spec.solarize_p
    scale = np.tile(1 / np.asarray(spec.std), (batch, 1))
    shift = np.tile(-np.asarray(spec.mean) / np.asarray(spec.std), (batch, 1))
    columns = [crop, flip[:, None], matrix.reshape(batch, 9), mean_term.reshape(batch, 9), offset]
    columns += [grey[:, None], solarize[:, None], scale, shift, taps]
    return np.concatenate(columns, 1).astype(np.float32)


# ------------------------------------------------------------------------------------ pixel ops (device)


def resize_weights(start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor, size: int, extent: int):
    """(N, size, extent) weights taking the span [start, start + length) of an axis to `size` pixels,
    mirrored where `flip`: torchvision's antialiased bilinear resize (PIL's algorithm), i.e. a triangle
    filter at each output pixel's centre, widened by the shrink factor, clipped to the span, normalised."""
    scale = (length / size)[:, None, None]  # (N, 1, 1) source pixels per output pixel
    out = torch.arange(size, dtype=torch.float32, device=start.device)[None, :, None] + 0.5
    out = torch.where(flip[:, None, None], size - out, out)
    centre = start[:, None, None] + out * scale
    pixel = torch.arange(extent, dtype=torch.float32, device=start.device) + 0.5  # source pixel centres
    weights = (1 - (pixel - centre).abs() / scale.clamp(min=1)).clamp_(min=0)
    weights *= (pixel >= start[:, None, None]) & (pixel < (start + length)[:, None, None])
    return weights / weights.sum(-1, keepdim=True)


def separable(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """rows @ x @ cols^T per sample: (N, 3, H, W), (N, S, H), (N, T, W) -> (N, 3, S, T)."""
    batch, channels, height, _ = x.shape
    y = torch.bmm(x.flatten(1, 2), cols.transpose(1, 2))  # (N, 3H, T)
    return rows[:, None] @ y.view(batch, channels, height, -1)


def blur(x: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """Separable blur of (N, 3, S, S) with one (k,) kernel per sample, (N, k), and reflect padding:
    a depthwise convolution over the N * 3 channels of one image, along W then H."""
    batch, channels, height, width = x.shape
    half = taps.shape[1] // 2
    kernels = taps.repeat_interleave(channels, 0)[:, None, None, :]  # (N*3, 1, 1, k)
    y = F.pad(x.reshape(1, batch * channels, height, width), [half, half, half, half], mode="reflect")
    y = F.conv2d(y, kernels, groups=batch * channels)
    y = F.conv2d(y, kernels.transpose(2, 3), groups=batch * channels)
    return y.view(batch, channels, height, width)


def augment_group(
    pixels: torch.Tensor, sizes: torch.Tensor, specs: list[ViewSpec], rng: np.random.Generator
) -> torch.Tensor:
    """Views of one output size: (B, 3, H, W) float pixels in [0, 255] -> (V * B, 3, S, S), view-major."""
    batch, device, size = len(pixels), pixels.device, specs[0].size
    order = rng.permutation(4).tolist()  # colour-jitter order of this batch
    host = np.concatenate([view_params(spec, sizes.numpy(), order, rng) for spec in specs])
    params = torch.from_numpy(host).to(device, non_blocking=True)
    crop, flip = params[:, :4], params[:, 4] > 0.5
    colour, mean_term, offset = params[:, 5:14], params[:, 14:23], params[:, 23:26]
    grey, solarize = params[:, 26] > 0.5, params[:, 27] > 0.5
    scale, shift, taps = params[:, 28:31], params[:, 31:34], params[:, 34:]

    top, left, height, width = crop.unbind(1)
    rows = resize_weights(top, height, torch.zeros_like(flip), size, pixels.shape[2]) / 255
    cols = resize_weights(left, width, flip, size, pixels.shape[3])
    x = torch.cat(
        [
            separable(pixels, rows[v * batch : (v + 1) * batch], cols[v * batch : (v + 1) * batch])
            for v in range(len(specs))
        ]
    )  # (V*B, 3, S, S) in [0, 1]
    if any(s.jitter_p > 0 for s in specs):
        colour_offset = offset + (mean_term.view(-1, 3, 3) @ x.mean((2, 3))[:, :, None])[:, :, 0]
        x = torch.baddbmm(colour_offset[:, :, None], colour.view(-1, 3, 3), x.flatten(2)).clamp_(0, 1)
        x = x.view(-1, 3, size, size)
    if any(s.grayscale_p > 0 for s in specs):
        luma = torch.einsum("c,nchw->nhw", torch.tensor(GREY_WEIGHTS, dtype=torch.float32, device=device), x)
        x = torch.where(grey[:, None, None, None], luma[:, None], x)
    if any(s.blur_p > 0 for s in specs):
        x = blur(x, taps)
    if any(s.solarize_p > 0 for s in specs):
        threshold = round(specs[0].solarize_threshold * 255) / 255  # torchvision's uint8 threshold
        x = torch.where(solarize[:, None, None, None] & (x >= threshold), 1.0 - x, x)
    return torch.addcmul(shift[:, :, None, None], x, scale[:, :, None, None])  # (x - mean) / std


class BatchAugment:
    """All views of a recipe for one batch: `augment(images, sizes, rng)` -> [V x (B, 3, S_v, S_v)]."""

    def __init__(
        self, specs: list[ViewSpec], *, dtype: torch.dtype, memory_format: torch.memory_format
    ) -> None:
        self.specs, self.dtype, self.memory_format = specs, dtype, memory_format
        # Views augmented together: consecutive views of one size, blur kernel and solarise threshold.
        key = [(s.size, s.blur_kernel, s.solarize_threshold) for s in specs]
        self.groups = [len(list(run)) for _, run in groupby(key)]

    def __call__(
        self, images: torch.Tensor, sizes: torch.Tensor, rng: np.random.Generator
    ) -> list[torch.Tensor]:
        pixels, batch = images.float(), len(images)  # float once for every view
        views, first = [], 0
        for count in self.groups:
            out = augment_group(pixels, sizes, self.specs[first : first + count], rng)
            out = out.to(self.dtype).contiguous(memory_format=self.memory_format)
            views += list(out.split(batch))
            first += count
        return views
