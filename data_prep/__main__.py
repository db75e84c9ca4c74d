"""`python -m data_prep {shard,verify}`: the command line. Exit codes: 0 ok, 1 damage found or a worker
died (re-run to resume), 2 bad input (missing SRC, OUT inside SRC, unwritable OUT, bad credentials, bad
flag, SRC or OUT lost mid-run: re-run to resume), 130 interrupted (SIGINT or SIGTERM: workers stopped,
temp files removed, finished shards kept)."""

from __future__ import annotations

import argparse
import signal
import sys

from data_prep.shard import OutputError, ShardConfig, WorkerDied, quiet_abandoned_tasks, shard
from data_prep.sources import SourceError
from data_prep.verify import ManifestError, verify

SHARD_EXAMPLES = """\
sources (SRC):
  a folder               class sub-folders give labels with --labels auto; a flat folder gives none
  a text file            one path or URL per line, optionally followed by TAB and a class name
  a .tar / .zip archive  member folders give labels as for a folder
  any fsspec URL         s3://bucket/prefix (folder, list or archive), credentials from the usual
                         AWS_* variables; AWS_ENDPOINT_URL_S3 for S3-compatible stores

examples:
  python -m data_prep shard sample_data/cifar10_mini/train /tmp/shards --samples-per-shard 250
  python -m data_prep shard ~/imagenet/train s3://bucket/imagenet --workers 16 --resize-short 256 \\
      --val-fraction 0.01 --seed 0
  python -m data_prep shard ../shared/data/cifar10/train-00.tar /tmp/c10 --labels auto
  python -m data_prep shard urls.txt /tmp/shards --labels none

Interrupted? Run the same command again: finished shards are kept, the rest are written, and the
result is byte-identical to an uninterrupted run. manifest.json is written last.
"""

VERIFY_EXAMPLES = """\
examples:
  python -m data_prep verify /tmp/shards
  python -m data_prep verify s3://bucket/imagenet

Exits 1 and prints one line per damaged shard and sample key when anything does not match.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep",
        description="Turn image corpora into WebDataset shards with DALI indexes, and check them.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser(
        "shard", help="write shards, .idx files and manifest.json", epilog=SHARD_EXAMPLES, formatter_class=raw
    )
    p.add_argument("src", metavar="SRC", help="folder, text list, tar/zip archive or fsspec URL")
    p.add_argument("out", metavar="OUT", help="output folder or fsspec URL (e.g. s3://bucket/prefix)")
    p.add_argument("--samples-per-shard", type=int, default=1000, metavar="N", help="default: 1000")
    p.add_argument("--workers", type=int, default=1, metavar="W", help="parallel processes (default: 1)")
    p.add_argument("--labels", choices=("auto", "none"), default="auto", help="default: auto")
    p.add_argument(
        "--resize-short",
        type=int,
        default=None,
        metavar="S",
        help="shrink so the short side is S px and re-encode (default: keep original bytes)",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this fraction as val-* shards (default: 0)",
    )
    p.add_argument("--seed", type=int, default=0, metavar="S", help="shuffle seed (default: 0)")
    v = sub.add_parser(
        "verify",
        help="re-read every shard and check it against manifest.json",
        epilog=VERIFY_EXAMPLES,
        formatter_class=raw,
    )
    v.add_argument("out", metavar="OUT", help="folder or fsspec URL holding manifest.json")
    return parser


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C: workers stopped, temp files removed


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    progress = sys.stderr.isatty()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    quiet_abandoned_tasks()
    try:
        if args.command == "shard":
            try:
                cfg = ShardConfig(
                    samples_per_shard=args.samples_per_shard,
                    workers=args.workers,
                    labels=args.labels,
                    resize_short=args.resize_short,
                    val_fraction=args.val_fraction,
                    seed=args.seed,
                )
            except ValueError as e:
                parser.error(str(e))  # exits 2
            print(shard(args.src, args.out, cfg, progress=progress).line())
            return 0
        report = verify(args.out, progress=progress)
        for problem in report.problems:
            print(f"damaged: {problem}", file=sys.stderr)
        print(report.line())
        return 0 if report.ok else 1
    except (SourceError, OutputError, ManifestError) as e:
        print(f"data_prep: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(
            f"data_prep: a worker process died ({e}); finished shards are kept, re-run to resume",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            "data_prep: interrupted; finished shards are kept, re-run the same command to resume",
            file=sys.stderr,
        )
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
