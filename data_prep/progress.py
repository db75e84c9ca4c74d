"""Progress of a long run: a tqdm bar on a terminal; elsewhere (`kubectl logs`, a batch log) one plain
line every `interval_s` seconds with counts, rate, rejections and ETA, so hours are never silent."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    def __init__(self, what: str, total: int, unit: str, interval_s: float, stream: TextIO | None = None):
        self.what, self.total, self.unit, self.interval_s = what, total, unit, interval_s
        self.stream = stream or sys.stderr
        self.done = self.rejected = 0
        self.start = self._last = time.monotonic()
        tty = self.stream.isatty()
        self._bar = tqdm(total=total, unit=unit, file=self.stream) if tty else None

    def update(self, done: int, rejected: int = 0) -> None:
        self.done += done
        self.rejected += rejected
        if self._bar is not None:
            self._bar.update(done)
            return
        now = time.monotonic()
        if self.interval_s > 0 and now - self._last >= self.interval_s:
            self._last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.done) / rate) if rate > 0 else "?"
        return (
            f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.0f} {self.unit}/s, "
            f"{self.rejected} rejected, elapsed {_clock(elapsed)}, ETA {eta}"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
