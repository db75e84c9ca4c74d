"""`python -m pipeline.train --config FILE [--config FILE ...] [--print-config] [dotted.key=value ...]`
— pretrain one model. Several config files merge in order (pipeline.schema.compose), then the overrides.

The same command runs under `torchrun` (it reads RANK/WORLD_SIZE/LOCAL_RANK; world size 1 without them).
The config is validated before anything starts: a mistake is one line naming the key, exit code 2.
Exit codes: 0 done or stopped by its own signal with a checkpoint saved; 1 the loss diverged or an
unexpected error (a traceback); 2 refused, in one line naming the key or path: a config mistake, a
resume that would change what the run learns, an unwritable, full or damaged checkpoint location, a
run folder in use, shards that became unreadable mid-run; 138 stopped because another rank was
signalled or lost: restart the job (pipeline/engine/preemption.py).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Any

from pipeline.config import load, to_dict
from pipeline.schema import ConfigError

EXAMPLES = """examples:
  python -m pipeline.train --config configs/debug.yaml data.train_shards=/data/shards run.output_dir=runs/dbg
  torchrun --standalone --nproc_per_node 8 -m pipeline.train --config configs/imagenet_simclr.yaml \\
      data.train_shards=s3://bucket/imagenet checkpoint.dir=s3://bucket/runs/simclr/checkpoints
  python -m pipeline.train --config configs/imagenet_mocov2.yaml train.engine=deepspeed \\
      train.deepspeed_config=configs/deepspeed/zero1.json optim.name=sgd
  python -m pipeline.train --config configs/cifar10_simclr.yaml --config my_cluster.yaml --print-config
"""


def missing_extra(cfg: Any) -> str | None:
    """The one-line refusal when the config picks DALI or DeepSpeed, extras of `pip install .`, and it is
    not installed (looked up without importing it: the check stays cheap)."""
    needs = (  # (chosen, key, module, extra, the way out)
        (cfg.data.backend == "dali", "data.backend=dali", "nvidia.dali", "dali", "data.backend=torch"),
        (
            cfg.train.engine == "deepspeed",
            "train.engine=deepspeed",
            "deepspeed",
            "deepspeed",
            "train.engine=ddp",
        ),
    )
    for chosen, key, module, extra, way_out in needs:
        if chosen and not _installed(module):
            return f"{key} needs {module}, which is not installed: pip install '.[{extra}]', or use {way_out}"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a missing parent package; a module blocked (None in sys.modules)
        return False


def banner(trainer: Any) -> None:
    """What is about to run, on rank 0 before the first step: data, steps, ranks, batch and lr."""
    from pipeline.optim.schedule import peak_lr

    cfg, budget, env = trainer.cfg, trainer.budget, trainer.env
    batch = budget.global_batch_size
    per_rank = f"{cfg.data.batch_size} x {env.world_size} rank(s) x {budget.grad_accum_steps} accumulation"
    opt = cfg.optim
    lr = f"{peak_lr(opt, batch):.4g} ({opt.lr:g} x {batch}/{opt.reference_batch_size}, {opt.lr_scaling})"
    print(
        f"pipeline.train: {cfg.method.name} on {cfg.model.backbone}, {cfg.run.output_dir}\n"
        f"  data: {budget.steps_per_epoch * batch:,} samples/epoch from {cfg.data.train_shards} "
        f"(backend {cfg.data.backend}, {cfg.data.image_size} px)\n"
        f"  steps: {budget.steps_per_epoch}/epoch x {cfg.train.epochs} epoch(s), to step {budget.last_step}\n"
        f"  world size {env.world_size} ({cfg.train.engine} on {env.device.type}); global batch {batch} "
        f"({per_rank}); peak lr {lr}",
        flush=True,
    )


def summary(cfg: Any, result: Any) -> str:
    """The end of a finished run: where it stopped, its checkpoint and the commands that come next."""
    out = cfg.run.output_dir
    return (
        f"pipeline.train: finished at step {result.step} (epoch {result.epoch}); checkpoint "
        f"{result.last_checkpoint}\n"
        f"  next: python -m pipeline.eval knn --checkpoint {out}\n"
        f"        python -m pipeline.export --checkpoint {out} --format timm --out {out}/backbone.pt"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Contrastive self-supervised pretraining from WebDataset shards.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        required=True,
        action="append",
        help="YAML file (see configs/); repeat to merge several in order, later files winning",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, YAML values")
    args = parser.parse_args(argv)
    try:
        cfg = load(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    missing = missing_extra(cfg)
    if missing:
        print(f"config error: {missing}", file=sys.stderr)
        return 2

    from pipeline.data.shards import UnreadableShards
    from pipeline.distributed import leave_process_group
    from pipeline.engine.checkpoint import CheckpointError
    from pipeline.engine.health import TrainingDiverged
    from pipeline.engine.logger import LoggingError
    from pipeline.engine.preemption import EXIT_RESTART, PEER_SIGNAL, lost_a_peer
    from pipeline.engine.runlock import RunFolderBusy
    from pipeline.engine.trainer import train

    completed = False
    try:
        result = train(cfg, announce=banner)
        completed = True
        if result.stopped_by == PEER_SIGNAL:
            return EXIT_RESTART
        if result.stopped_by is None and int(os.environ.get("RANK", "0")) == 0:
            print(summary(cfg, result), flush=True)
    except ConfigError as e:  # found while building (e.g. no manifest.json at data.train_shards)
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, RunFolderBusy, LoggingError) as e:  # storage, a busy run folder, W&B
        print(f"error: {e}", file=sys.stderr)
        return 2
    except UnreadableShards as e:  # deleted or damaged mid-run: the newest checkpoint stays resumable
        print(f"error: {UnreadableShards.one_line(e)}", file=sys.stderr)
        return 2
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not lost_a_peer(e):
            raise
        print(f"error: lost a peer rank, exit {EXIT_RESTART} to restart the job: {e}", file=sys.stderr)
        return EXIT_RESTART
    finally:
        leave_process_group(completed=completed)
    return 0


def run() -> None:
    """The process's whole life (`python -m pipeline.train`, the `contrastive-train` command): main, then
    the exit status file and, under torchrun, the rank's exit."""
    from pipeline.engine.preemption import write_exit_status

    status = 1  # an exception escaped: a crash, not a reason to restart
    try:
        status = main()
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        status = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        write_exit_status(status)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from pipeline.distributed import exit_rank

        exit_rank(status)  # everything is written; skip the teardown that can abort a rank (see there)
    sys.exit(status)


if __name__ == "__main__":
    run()
