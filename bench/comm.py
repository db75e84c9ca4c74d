"""`python -m bench comm`: every collective one training step issues, its bytes per rank, and what it
would cost on 8 / 64 / 512 GPUs.

Measured: the trainer's own `train_step` (pipeline.engine.trainer) of a config runs on W gloo processes
on the CPU, fed synthetic batches of the config's view shapes (the loader issues no collectives). While
it runs, torch.distributed's collective functions are wrapped, and a DDP comm hook records each
gradient bucket before all-reducing it as DDP's default hook does; each call is recorded with its kind,
dtype, payload bytes per rank and the code path that issued it. Every payload is a + b W + c B + d W B
in the world size W and the per-rank batch B (gradients: a; gathered embeddings: d W B; shuffled images:
c B), so two batch sizes at two world sizes fit it exactly; further points check the fit.

Predicted, per collective, from link bandwidths (no latency term, no overlap with compute: DDP does
overlap its buckets with backward, so this bounds the gradient cost from above). W GPUs, G per node,
N = W / G nodes; b_intra: NVLink bus bandwidth per GPU; b_inter: network bandwidth per GPU (one NIC per
GPU); n: payload bytes per rank. Hierarchical, as NCCL moves data over NVLink then the NICs:
  all_reduce      2 (G-1)/G n / b_intra + 2 (N-1)/N (n/G) / b_inter
  all_gather      (G-1)/G n / b_intra + (N-1)/N (n/G) / b_inter    (n: the gathered output)
  reduce_scatter  as all_gather                                    (n: the full input)
  all_to_all      (G-1)/W n / b_intra + (W-G)/W n / b_inter        (n: rows sent, spread evenly)
  broadcast       n / b_intra + [N > 1] (n/G) / b_inter
On one node these are the ring formulas 2 (W-1)/W n and (W-1)/W n over NVLink. A collective on a
fixed-size subgroup (the shuffle group) keeps that size at every W. Weak-scaling efficiency =
compute / (compute + communication), compute = views per GPU per step / views per second.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import socket
import sys
import tempfile
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.config import Config, ConfigError, load

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = """examples:
  python -m bench comm                                        # debug config, W = 2 4 8, its method
  python -m bench comm --methods simclr mocov2 --worlds 2 4
  python -m bench comm --config configs/imagenet_mocov2.yaml --batch-sizes 2 4 --predict-batch-size 32 \\
      --worlds 2 4 data.backend=cpu
  python -m bench comm --methods mocov2 method.shuffle_group_size=2 --worlds 4 8 --gpus-per-node 2

defaults: b_intra 350 GB/s, NCCL bus bandwidth inside an H100 node (NVLink 4: 450 GB/s per direction per
GPU; all-reduce reaches 350-450 in practice); b_inter 45 GB/s, one 400 Gb/s NDR InfiniBand NIC per GPU as
in a DGX H100 (50 GB/s line rate, ~90 % reached); compute: ResNet-50 at 224 px, 4,040 views/s per H100
(bf16, SimCLR step, DESIGN.md section 5), applied to every method's views.
"""
RECORDED = (  # torch.distributed functions wrapped while the bench runs (those this torch has)
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "all_to_all", "all_to_all_single",
    "barrier", "reduce", "gather", "scatter", "all_gather_object", "broadcast_object_list", "send", "recv",
    "isend", "irecv",
)  # fmt: skip
DDP_SITE = "DDP gradient buckets (comm hook)"


# ------------------------------------------------------------------------------------------ recording


@dataclass(frozen=True)
class Call:
    kind: str
    dtype: str | None
    bytes: int | None  # payload per rank (see the module docstring); None for object collectives
    sent_bytes: float | None  # what this rank puts on links at this W (flat ring; all-to-all: exact)
    group_size: int
    site: str


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _payload(kind: str, a: dict[str, Any], ranks: int, rank: int) -> tuple[torch.Tensor | None, int, float]:
    """(a tensor of the call, payload bytes, bytes sent by this rank) for one call's bound arguments."""
    spread = (ranks - 1) / ranks
    if kind == "all_reduce":
        t = a["tensor"]
        return t, _nbytes(t), 2 * spread * _nbytes(t)
    if kind == "all_gather":
        t = a["tensor"]
        return t, ranks * _nbytes(t), spread * ranks * _nbytes(t)
    if kind in ("all_gather_into_tensor", "all_gather_single"):  # SyncBN's statistics on NCCL
        t = a["output_tensor"]
        return t, _nbytes(t), spread * _nbytes(t)
    if kind in ("reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single"):
        parts = a["input_list"] if kind == "reduce_scatter" else [a["input"]]
        n = sum(_nbytes(p) for p in parts)
        return parts[0], n, spread * n
    if kind == "all_to_all_single":
        t, splits = a["input"], a.get("input_split_sizes")
        row = _nbytes(t) // max(t.shape[0], 1)
        own = splits[rank] * row if splits else _nbytes(t) // ranks
        return t, _nbytes(t), _nbytes(t) - own
    if kind == "all_to_all":
        parts = a["input_tensor_list"]
        return (
            parts[0],
            sum(_nbytes(p) for p in parts),
            sum(_nbytes(p) for i, p in enumerate(parts) if i != rank),
        )
    if kind == "barrier":
        return None, 0, 0.0
    t = a.get("tensor")  # broadcast, reduce, point-to-point, gather, scatter
    return t, _nbytes(t), (spread if kind == "broadcast" else 1.0) * _nbytes(t)


def _site() -> str:
    """The code path of the running collective: the first caller outside pipeline/distributed, then the
    pipeline/distributed functions it went through (outermost first)."""
    frames = [f for f in traceback.extract_stack() if f.filename.startswith(str(REPO / "pipeline"))]
    names = [f"{Path(f.filename).name}:{f.name}" for f in frames]
    inside = [i for i, f in enumerate(frames) if "/pipeline/distributed/" in f.filename]
    if not inside:
        return names[-1] if names else "outside pipeline/"
    callers = [i for i in range(inside[0]) if "/pipeline/distributed/" not in frames[i].filename]
    return " > ".join(names[i] for i in ([callers[-1]] if callers else []) + inside)


class CollectiveRecorder:
    """Wraps torch.distributed's collectives for the life of the process; records while `on`."""

    def __init__(self) -> None:
        self.on = False
        self.calls: list[Call] = []
        self.original: dict[str, Callable] = {}
        for kind in (k for k in RECORDED if hasattr(dist, k)):
            fn = getattr(dist, kind)
            self.original[kind] = fn
            setattr(dist, kind, self._wrap(kind, fn, inspect.signature(fn)))

    def _wrap(self, kind: str, fn: Callable, signature: inspect.Signature) -> Callable:
        def recorded(*args: Any, **kwargs: Any) -> Any:
            if self.on:
                bound = signature.bind(*args, **kwargs).arguments
                group = bound.get("group")
                if kind in ("all_gather_object", "broadcast_object_list"):
                    self._add(kind, None, None, None, group)
                else:
                    ranks, rank = dist.get_world_size(group), dist.get_rank(group)
                    tensor, n, sent = _payload(kind, bound, ranks, rank)
                    self._add(kind, tensor, n, sent, group)
            return fn(*args, **kwargs)

        return recorded

    def _add(
        self,
        kind: str,
        tensor: torch.Tensor | None,
        n: int | None,
        sent: float | None,
        group: dist.ProcessGroup | None,
        site: str | None = None,
    ) -> None:
        dtype = str(tensor.dtype).removeprefix("torch.") if tensor is not None else None
        self.calls.append(Call(kind, dtype, n, sent, dist.get_world_size(group), site or _site()))

    def ddp_hook(self, state, bucket):  # unannotated: DDP rejects the string annotations of this module
        """DDP's default all-reduce hook (average the bucket), recording the bucket first."""
        tensor, ranks = bucket.buffer(), dist.get_world_size()
        if self.on:
            self._add(
                "all_reduce",
                tensor,
                _nbytes(tensor),
                2 * (ranks - 1) / ranks * _nbytes(tensor),
                None,
                DDP_SITE,
            )
        tensor.div_(ranks)
        work = self.original["all_reduce"](tensor, async_op=True)
        return work.get_future().then(lambda fut: fut.value()[0])


# ------------------------------------------------------------------------------------------ the ranks


def _view_sizes(cfg: Config) -> list[int]:
    from pipeline.data.recipes import resolve_views

    return [spec.size for spec in resolve_views(cfg.data)]


def _synthetic_batches(cfg: Config, batch_size: int, seed: int) -> Iterator[Any]:
    """Batches of the loader's shapes (every view of the recipe) and labels: what the step sees."""
    from pipeline.data import Batch

    g = torch.Generator().manual_seed(seed)
    sizes = _view_sizes(cfg)
    while True:
        views = [torch.randn(batch_size, 3, s, s, generator=g) for s in sizes]
        yield Batch(views=views, labels=torch.randint(0, 10, (batch_size,), generator=g))


def _aggregate(calls: list[Call], steps: int) -> list[dict[str, Any]]:
    """Per (kind, site, dtype, group size): calls and bytes per step."""
    total: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0.0])
    for c in calls:
        entry = total[(c.kind, c.site, c.dtype, c.group_size)]
        entry[0] += 1
        entry[1] += c.bytes or 0
        entry[2] += c.sent_bytes or 0.0
    return [
        {"kind": k, "site": s, "dtype": d, "group_size": g, "calls": n / steps, "bytes": b / steps,
         "sent_bytes": sent / steps}
        for (k, s, d, g), (n, b, sent) in total.items()
    ]  # fmt: skip


def _rank_main(r: int, world: int, port: int, job: dict[str, Any], out: str) -> None:
    os.environ.update({"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world)})
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from pipeline.distributed import exit_rank, init_from_env, leave_process_group
    from pipeline.engine.trainer import (
        StepContext,
        build_engine,
        build_precision,
        seed_everything,
        train_step,
    )
    from pipeline.methods import build_method

    recorder = CollectiveRecorder()
    completed, rows = False, []
    try:
        env = init_from_env(timeout_s=300)
        for method, overrides in job["runs"]:
            cfg = load(job["config"], overrides)
            seed_everything(cfg.run.seed, False)
            accum = cfg.train.grad_accum_steps
            global_batch_size = cfg.data.batch_size * world * accum
            engine = build_engine(
                cfg, build_method(cfg), env.device, global_batch_size, torch.contiguous_format
            )
            engine.ddp.register_comm_hook(None, recorder.ddp_hook)
            ctx = StepContext(
                device=env.device,
                precision=build_precision(cfg, env.device),
                memory_format=torch.contiguous_format,
                grad_accum_steps=accum,
                world_size=world,
                total_steps=job["warmup"] + job["steps"],
            )
            engine.module.train()
            for b in job["batch_sizes"]:
                batches = _synthetic_batches(cfg, b, seed=1000 * r + b)
                for step in range(job["warmup"]):
                    train_step(engine, batches, ctx, step, False)
                recorder.calls, recorder.on = [], True
                for step in range(job["steps"]):
                    train_step(engine, batches, ctx, job["warmup"] + step, False)
                recorder.on = False
                views = len(_view_sizes(cfg)) * accum  # per sample and optimizer step
                for row in _aggregate(recorder.calls, job["steps"]):
                    rows.append({"method": method, "world": world, "batch_size": b, "views": views, **row})
        every_rank: list[Any] = [None] * world
        dist.all_gather_object(every_rank, rows)
        if r == 0:
            Path(out).write_text(json.dumps(_mean_over_ranks(every_rank)))
        completed = True
    finally:
        leave_process_group(completed=completed)
    exit_rank(0)


def _mean_over_ranks(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rank 0's rows, `sent_bytes` averaged over ranks (an all-to-all's split varies by rank); every rank
    must have issued the same collectives with the same payloads."""
    key = ("method", "batch_size", "kind", "site", "dtype", "group_size", "calls", "bytes")
    first = [tuple(row[k] for k in key) for row in per_rank[0]]
    for r, rows in enumerate(per_rank):
        if [tuple(row[k] for k in key) for row in rows] != first:
            raise RuntimeError(f"rank {r} issued other collectives than rank 0: {rows} vs {per_rank[0]}")
    out = []
    for i, row in enumerate(per_rank[0]):
        out.append({**row, "sent_bytes": sum(rows[i]["sent_bytes"] for rows in per_rank) / len(per_rank)})
    return out


def measure(config: str, runs: list[tuple[str, list[str]]], world: int, job: dict[str, Any]) -> list[dict]:
    """Rows of every (method, batch size, collective) at one world size, from W spawned gloo ranks."""
    with tempfile.TemporaryDirectory(prefix="bench-comm-") as tmp, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        out = str(Path(tmp) / "rows.json")
        mp.spawn(_rank_main, args=(world, port, {**job, "config": config, "runs": runs}, out), nprocs=world)
        return json.loads(Path(out).read_text())


# ------------------------------------------------------------------------------------------ prediction


@dataclass(frozen=True)
class Links:
    intra_gbps: float  # NVLink bus bandwidth per GPU inside a node, GB/s
    inter_gbps: float  # network bandwidth per GPU across nodes, GB/s
    gpus_per_node: int


def collective_seconds(kind: str, n: float, ranks: int, links: Links) -> float:
    """Bandwidth-only time of one collective of payload `n` bytes per rank over `ranks` GPUs."""
    g = min(ranks, links.gpus_per_node)
    nodes = ranks / g
    intra, inter = links.intra_gbps * 1e9, links.inter_gbps * 1e9
    across = (nodes - 1) / nodes * (n / g) / inter
    if kind == "all_reduce":
        return 2 * (g - 1) / g * n / intra + 2 * across
    if kind.startswith(("all_gather", "reduce_scatter")):
        return (g - 1) / g * n / intra + across
    if kind in ("all_to_all", "all_to_all_single"):
        return (g - 1) / ranks * n / intra + (ranks - g) / ranks * n / inter
    if kind == "broadcast":
        return n / intra + (n / g / inter if nodes > 1 else 0.0)
    return 0.0


def fit(points: list[tuple[int, int, float]]) -> tuple[list[float], float]:
    """Coefficients of bytes = a + b W + c B + d W B over (W, B, bytes) points, and the largest error."""
    basis = torch.tensor([[1.0, w, b, w * b] for w, b, _ in points], dtype=torch.float64)
    target = torch.tensor([[n] for _, _, n in points], dtype=torch.float64)
    coef = torch.linalg.lstsq(basis, target).solution
    error = float((basis @ coef - target).abs().max())
    return coef.flatten().tolist(), error


def predict(rows: list[dict[str, Any]], args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """One row per method and GPU count: bytes and milliseconds per collective, compute, efficiency."""
    links = Links(args.intra_gbps, args.inter_gbps, args.gpus_per_node)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        points = sorted({(r["world"], r["batch_size"]) for r in mine})
        series: dict[tuple, dict[tuple[int, int], dict]] = defaultdict(dict)
        for r in mine:
            series[(r["kind"], r["site"], r["dtype"])][(r["world"], r["batch_size"])] = r
        b = args.predict_batch_size
        views = mine[0]["views"] * b
        compute_s = args.compute_ms / 1000 if args.compute_ms else views / args.views_per_s
        for gpus in args.predict_gpus:
            by_site, worst = {}, 0.0
            for (kind, site, _), seen in series.items():
                coef, error = fit(
                    [(w, bs, seen[(w, bs)]["bytes"] if (w, bs) in seen else 0.0) for w, bs in points]
                )
                worst = max(worst, error)
                n = coef[0] + coef[1] * gpus + coef[2] * b + coef[3] * gpus * b
                sizes = {r["group_size"] for r in seen.values()}
                fixed = any(r["group_size"] != w for (w, _), r in seen.items())
                ranks = min(sizes) if fixed else gpus
                ms = 1000 * collective_seconds(kind, n, ranks, links)
                by_site[f"{kind} {site}"] = {"bytes": round(n), "ms": round(ms, 3), "ranks": ranks}
            comm_s = sum(v["ms"] for v in by_site.values()) / 1000
            yield {
                "bench": "comm",
                "predicted": True,
                "method": method,
                "gpus": gpus,
                "nodes": max(1, gpus // args.gpus_per_node),
                "batch_size": b,
                "views_per_gpu_step": views,
                "compute_ms": round(1000 * compute_s, 2),
                "comm_ms": round(1000 * comm_s, 3),
                "efficiency": round(compute_s / (compute_s + comm_s), 4),
                "bytes_per_gpu_step": round(sum(v["bytes"] for v in by_site.values())),
                "fit_max_error_bytes": round(worst, 3),
                "by_collective": by_site,
            }


# ------------------------------------------------------------------------------------------ command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench comm",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--methods", nargs="+", default=None, help="method.name values (default: the config's)")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8], help="gloo processes per measurement")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: data.batch_size and 2x")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded steps per batch size")
    p.add_argument("--steps", type=int, default=1, help="recorded steps per batch size")
    p.add_argument("--predict-gpus", type=int, nargs="+", default=[8, 64, 512])
    p.add_argument("--predict-batch-size", type=int, default=None, help="per GPU (default: data.batch_size)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--intra-gbps", type=float, default=350.0, help="NVLink bus bandwidth per GPU, GB/s")
    p.add_argument("--inter-gbps", type=float, default=45.0, help="network bandwidth per GPU, GB/s")
    p.add_argument(
        "--views-per-s", type=float, default=4040.0, help="compute rate per GPU (default: H100 R50)"
    )
    p.add_argument("--compute-ms", type=float, default=None, help="compute per step instead of --views-per-s")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = p.parse_args(argv)
    try:
        base = load(args.config, args.overrides)
        methods = args.methods or [base.method.name]
        runs = [(m, [*args.overrides, f"method.name={m}"]) for m in methods]
        for _, overrides in runs:
            cfg = load(args.config, overrides)
            if cfg.train.engine != "ddp":
                raise ConfigError(
                    "bench comm: train.engine must be ddp (its comm hook records the gradients)"
                )
            if cfg.train.sync_bn:
                raise ConfigError("bench comm: train.sync_bn has no CPU kernel; add train.sync_bn=false")
    except ConfigError as e:
        print(f"bench comm: {e}", file=sys.stderr)
        return 2
    batch_sizes = args.batch_sizes or [base.data.batch_size, 2 * base.data.batch_size]
    args.predict_batch_size = args.predict_batch_size or base.data.batch_size
    if len(set(args.worlds)) < 2 or len(set(batch_sizes)) < 2 or min(args.worlds) < 2:
        p.error("the fit needs two or more --worlds (each >= 2) and two or more --batch-sizes")
    links = {
        k: getattr(args, k)
        for k in ("intra_gbps", "inter_gbps", "gpus_per_node", "views_per_s", "compute_ms")
    }
    header = {"bench": "comm", "config": args.config, "overrides": args.overrides, "methods": methods,
              "worlds": args.worlds, "batch_sizes": batch_sizes, "backend": "gloo", "device": "cpu",
              "cpu_count": os.cpu_count(), "assumptions": links}  # fmt: skip
    print(json.dumps(header), flush=True)
    job = {"batch_sizes": batch_sizes, "warmup": args.warmup, "steps": args.steps}
    rows = []
    for world in args.worlds:
        measured = measure(args.config, runs, world, job)
        for row in measured:
            print(json.dumps({"bench": "comm", **row}), flush=True)
        for (method, b), group in _by_run(measured).items():
            total = {
                "bytes": sum(r["bytes"] for r in group),
                "sent_bytes": sum(r["sent_bytes"] for r in group),
            }
            print(
                json.dumps(
                    {
                        "bench": "comm",
                        "method": method,
                        "world": world,
                        "batch_size": b,
                        "kind": "total",
                        **total,
                    }
                )
            )
        rows += measured
    for row in predict(rows, args):
        print(json.dumps(row), flush=True)
    return 0


def _by_run(rows: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    out: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        out[(r["method"], r["batch_size"])].append(r)
    return out
