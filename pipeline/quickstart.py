"""`python -m pipeline.quickstart` (`make run`): the whole product on the CPU in a few minutes.

Shards the embedded CIFAR-10 sample (sample_data/cifar10_mini: 2,000 train + 500 val images), pretrains
SimCLR on it with configs/quickstart.yaml (the `torch` data backend: the sample decoded once, batches
augmented in the trainer process), evaluates kNN and a linear probe for the pretrained backbone
AND for the same architecture at random initialisation (the baseline pretraining must beat), draws the
embedding map, writes the report and prints where it is. Everything lands under --out (runs/quickstart).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "sample_data" / "cifar10_mini"
CONFIG = REPO / "configs" / "quickstart.yaml"


def shard(src: Path, out: Path) -> Path:
    """Shard one class-folder split with data_prep (reused when a complete manifest is already there)."""
    from data_prep.__main__ import main as data_prep

    if (out / "manifest.json").exists():
        return out
    argv = ["shard", str(src), str(out), "--labels", "auto", "--samples-per-shard", "500", "--workers", "1"]
    if data_prep([*argv, "--seed", "0"]) != 0:
        raise SystemExit(f"data_prep shard {src} failed")
    return out


def pretrain(config: Path, train: Path, val: Path, run_dir: Path, overrides: list[str]) -> None:
    """The trainer as a user runs it: a separate `python -m pipeline.train` process."""
    cmd = [sys.executable, "-m", "pipeline.train", "--config", str(config)]
    cmd += [f"data.train_shards={train}", f"data.val_shards={val}", f"run.output_dir={run_dir}", *overrides]
    # Half the cores for intra-op threads, the rest for the loader's decode worker and for other work:
    # oversubscribed OpenMP threads spin against each other and stall every step.
    env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2)), **os.environ}
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env=env)


def evaluate(run_dir: Path, eval_dir: Path) -> dict[str, dict]:
    """kNN and linear probe for the pretrained and the random-init backbone; {"knn-pretrained": row, ...}."""
    from pipeline.eval.__main__ import main as eval_main

    results = {}
    for protocol in ("knn", "linear"):
        for tag, extra in (("pretrained", []), ("random", ["--random-init"])):
            eval_main([protocol, "--checkpoint", str(run_dir), "--out", str(eval_dir), *extra])
            results[f"{protocol}-{tag}"] = json.loads((eval_dir / f"{protocol}-{tag}.json").read_text())
    for extra in ([], ["--random-init"]):
        eval_main(["embed", "--checkpoint", str(run_dir), "--out", str(eval_dir), "--method", "tsne", *extra])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.quickstart", description=__doc__)
    parser.add_argument("--out", default="runs/quickstart", help="folder for shards, run and report")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides for the training config")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    out = Path(args.out).resolve()
    train = shard(SAMPLE / "train", out / "shards" / "train")
    val = shard(SAMPLE / "val", out / "shards" / "val")
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh run each time: resuming a finished run would train nothing
    pretrain(Path(args.config), train, val, run_dir, args.overrides)
    trained = time.perf_counter()
    eval_dir = run_dir / "eval"
    results = evaluate(run_dir, eval_dir)

    from pipeline.eval.report import write_report

    md, page = write_report(run_dir, eval_dir, title="Quickstart: SimCLR on the CIFAR-10 sample")
    print(f"\n{'protocol':<8} {'pretrained':>11} {'random init':>12} {'gain':>7}")
    gains = {}
    for protocol in ("knn", "linear"):
        pre, rnd = results[f"{protocol}-pretrained"]["top1"], results[f"{protocol}-random"]["top1"]
        gains[protocol] = pre - rnd
        print(f"{protocol:<8} {100 * pre:>10.1f}% {100 * rnd:>11.1f}% {100 * (pre - rnd):>+6.1f}")
    total = time.perf_counter() - started
    print(f"\npretraining {trained - started:.0f} s, total {total:.0f} s")
    print(f"report: {md}\n        {page}")
    if min(gains.values()) <= 0:
        print("pretrained features did NOT beat random initialisation", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
