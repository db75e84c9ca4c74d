"""Losses compute logits and statistics in at least fp32, whatever autocast or the inputs say.

Under bf16 autocast a (B, B) similarity matrix in bf16 loses the positive pair's logit to rounding
(8 bits of mantissa at 1/temperature = 5..14) and batch statistics lose small variances.
float64 inputs stay float64, so tests can compare against float64 references tightly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Switch autocast off for the enclosed loss arithmetic (inputs are upcast explicitly)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield
