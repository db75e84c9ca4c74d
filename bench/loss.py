"""`python -m bench loss`: value, time and peak memory of NT-Xent implementations across batch sizes.

Variants, each a forward + backward of the loss w.r.t. two (pairs, dim) views:
  naive    the common implementation: the full (2N, 2N) similarity matrix, diagonal masked, cross-entropy;
  local    `info_nce(chunk_size=None)`: one rank's (2N/W, 2N) slice of it (the whole matrix when W = 1);
  chunked  `info_nce(chunk_size=C)`: the same rows as blockwise log-sum-exp, recomputed in backward.
With `--world W` > 1 the local and chunked rows measure one rank's share of a W-rank gathered batch
(its 2N/W anchors against all 2N candidates; communication not included).
Peak memory is the highest total of tensor bytes allocated above the pre-call level during one call:
torch.cuda.max_memory_allocated after a reset on a GPU; on the CPU the same quantity from the profiler's
record of every allocation and free (resident-set figures miss memory the allocator reuses).
One JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pipeline.losses import info_nce
from pipeline.losses.info_nce import nt_xent_rows
from pipeline.losses.precision import full_precision

VARIANTS = ["naive", "local", "chunked"]
EXAMPLES = """examples:
  python -m bench loss                                   # CPU: 256..4096 pairs
  python -m bench loss --pairs 4096 16384 32768 65536 --chunk-size 8192   # on a GPU (fp32, no TF32)
  python -m bench loss --pairs 65536 --world 8 --variants local chunked
"""


def naive_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The textbook (2N, 2N) implementation most codebases ship; the baseline to beat."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D)
    n = z1.shape[0]
    sim = z @ z.T / temperature  # (2N, 2N)
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def rank_share(
    z1: torch.Tensor, z2: torch.Tensor, temperature: float, world: int, chunk: int | None
) -> torch.Tensor:
    """Rank 0's part of a gathered `info_nce` over W ranks: its 2N/W anchors against all 2N candidates."""
    if world == 1:
        return info_nce(z1, z2, temperature, chunk_size=chunk)
    n = z1.shape[0] // world
    with full_precision(z1.device):  # as info_nce does
        z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
        anchors = torch.cat([z1[:n], z2[:n]])  # (2N/W, D): rank 0's rows come first in the gathered order
        others = [torch.cat([z1[r * n : (r + 1) * n], z2[r * n : (r + 1) * n]]) for r in range(1, world)]
        candidates = torch.cat([anchors, *others])  # (2N, D)
        return nt_xent_rows(anchors, candidates, temperature, 0, chunk)


class PeakMemory:
    """Peak bytes allocated above the baseline while the block runs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._profile = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._profile.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._profile.__exit__(*exc)
        cpu = torch.autograd.DeviceType.CPU
        changes = sorted(  # (time, +bytes allocated / -bytes freed)
            (e.start_ns(), e.nbytes())
            for e in self._profile.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == cpu
        )
        live = 0
        for _, delta in changes:
            live += delta
            self.peak_bytes = max(self.peak_bytes, live)


def measure(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    z1: torch.Tensor,
    z2: torch.Tensor,
    repeats: int,
    autocast_dtype: torch.dtype | None,
) -> dict:
    """Median forward + backward seconds over `repeats` (after one warm-up), peak memory of one call."""
    device = z1.device

    def call() -> float:
        a, b = z1.detach().clone().requires_grad_(), z2.detach().clone().requires_grad_()
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = fn(
                a.to(autocast_dtype) if autocast_dtype else a, b.to(autocast_dtype) if autocast_dtype else b
            )
        loss.backward()
        return loss.item()  # synchronises

    value = call()
    with PeakMemory(device) as mem:
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return {"value": value, "ms": 1000 * statistics.median(times), "peak_mib": mem.peak_bytes / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench loss",
        description=__doc__.split("\n\n")[0],
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cuda = torch.cuda.is_available()
    parser.add_argument("--pairs", type=int, nargs="+", default=None, help="positive pairs N (batch size)")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument(
        "--chunk-size", type=int, default=None, help="default: 8192 on a GPU, 1024 on the CPU"
    )
    parser.add_argument("--world", type=int, default=1, help="measure one rank's share of this many ranks")
    parser.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="inputs in bf16 under autocast")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if any(n % args.world for n in args.pairs or []):
        parser.error(f"--world {args.world} must divide every --pairs value")
    device = torch.device(args.device)
    pairs = args.pairs or (
        [4096, 8192, 16384, 32768, 65536] if device.type == "cuda" else [256, 1024, 2048, 4096]
    )
    chunk = args.chunk_size or (8192 if device.type == "cuda" else 1024)
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = {
        "naive": lambda a, b: naive_nt_xent(a, b, args.temperature),
        "local": lambda a, b: rank_share(a, b, args.temperature, args.world, None),
        "chunked": lambda a, b: rank_share(a, b, args.temperature, args.world, chunk),
    }
    g = torch.Generator(device=device).manual_seed(0)
    for n in pairs:
        z1 = torch.randn(n, args.dim, device=device, generator=g)
        z2 = z1 + 0.5 * torch.randn(n, args.dim, device=device, generator=g)  # correlated views
        naive_ms = None
        for name in args.variants:
            row = {"bench": "loss", "variant": name, "pairs": n, "dim": args.dim, "world": args.world,
                   "chunk_size": chunk if name == "chunked" else None, "device": str(device),
                   "dtype": "bf16-autocast" if args.bf16 else "fp32"}  # fmt: skip
            try:
                row |= measure(variants[name], z1, z2, args.repeats, torch.bfloat16 if args.bf16 else None)
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
                torch.cuda.empty_cache()
            if name == "naive" and "ms" in row:
                naive_ms = row["ms"]
            if naive_ms and "ms" in row:
                row["time_vs_naive"] = row["ms"] / naive_ms
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
