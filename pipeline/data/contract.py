"""What the trainer and every loader backend agree on."""

from __future__ import annotations

import torch


def memory_format(channels_last: bool, device: torch.device) -> torch.memory_format:
    """The one place that decides the layout of images and convolution weights: channels_last only on
    CUDA, where it speeds up convolutions (on the CPU it is slower)."""
    return torch.channels_last if channels_last and device.type == "cuda" else torch.contiguous_format
