"""`python -m data_prep {shard,index,merge,verify}`: the command line. Exit codes: 0 ok, 1 damage found,
a worker died (re-run to resume) or nothing written (every image rejected), 2 bad input (missing SRC,
OUT inside SRC, unwritable OUT, bad credentials, bad flag, labels that do not fit, a part another writer
holds, parts missing at merge, SRC or OUT lost mid-run: re-run to resume), 130 interrupted (SIGINT or
SIGTERM: workers stopped, temp files removed, finished shards kept)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from fsspec.core import url_to_fs

from data_prep.adopt import LabelError, LabelKey, index_shards
from data_prep.parts import WHOLE, MergeError, Part, PartBusy, merge
from data_prep.pool import WorkerDied, quiet_abandoned_tasks
from data_prep.shard import OutputError, ShardConfig, shard
from data_prep.sources import SourceError
from data_prep.tables import Columns, TableError
from data_prep.verify import ManifestError, verify

SHARD_EXAMPLES = """\
sources (SRC):
  a folder               class sub-folders give labels with --labels auto; a flat folder gives none
  a text file            one path or URL per line, optionally followed by TAB and a class name
  a .tar / .zip archive  member folders give labels as for a folder
  a .parquet/.csv/.tsv   a listing: one row per image, a path-or-URL column (--path-column) and an
                         optional label column (--label-column); read in row batches
  a datasets folder      `save_to_disk` output or Hub-style parquet shards with an image column of
                         {bytes, path} structs (--image-column); rows keep their table order
  any fsspec URL         s3://bucket/prefix (folder, list or archive), credentials from the usual
                         AWS_* variables; AWS_ENDPOINT_URL_S3 for S3-compatible stores

examples:
  python -m data_prep shard sample_data/cifar10_mini/train /tmp/shards --samples-per-shard 250
  python -m data_prep shard ~/imagenet/train s3://bucket/imagenet --workers 16 --resize-short 256 \\
      --val-fraction 0.01 --seed 0
  python -m data_prep shard ../shared/data/cifar10/train-00.tar /tmp/c10 --labels auto
  python -m data_prep shard urls.txt /tmp/shards --labels none
  python -m data_prep shard s3://bucket/inventory.parquet s3://bucket/shards --path-column url \
      --part 3/16 --merge        # part 3 of 16 (a Kubernetes Indexed Job: python -m launch.k8s render-prep)

Interrupted? Run the same command again: finished shards are kept, the rest are written, and the
result is byte-identical to an uninterrupted run. manifest.json is written last.
"""

VERIFY_EXAMPLES = """\
examples:
  python -m data_prep verify /tmp/shards
  python -m data_prep verify s3://bucket/imagenet

Exits 1 and prints one line per damaged shard and sample key when anything does not match.
Shards data_prep did not write (`data_prep index`) are checked for what they have: tar structure,
index agreement and decodable images; checksums only where data_prep recorded them.
"""

INDEX_EXAMPLES = """\
SHARDS: a .tar, a comma-separated list, a brace pattern or a folder of .tar files (local or s3://):
  python -m data_prep index /data/laion/{000000..041407}.tar --workers 16
  python -m data_prep index s3://bucket/wds --out /tmp/wds-index     # the bucket is read-only
  python -m data_prep index /data/wds --label-key json:label --classes classes.txt

The tars are never rewritten: each gets a DALI .idx (next to it, or under --out) and manifest.json
names the original tars. Interrupted? Run the same command again: indexed tars are not read again.
"""

MERGE_EXAMPLES = """\
example:
  python -m data_prep merge s3://bucket/shards    # after every `shard ... --part I/N` has finished
"""


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--part", type=_part, default=WHOLE, metavar="I/N", help="write part I of N (0 <= I < N)")
    p.add_argument("--merge", action="store_true", help="with --part: merge once every part has finished")
    p.add_argument(
        "--lock-wait",
        type=float,
        default=0.0,
        metavar="S",
        help="wait up to S seconds for another writer's lock on this part (default: 0, refuse at once)",
    )
    p.add_argument(
        "--path-column", metavar="NAME", help="table listings: the path/URL column (default: url, path, ...)"
    )
    p.add_argument(
        "--image-column", metavar="NAME", help="tables of images: the {bytes, path} column (default: image)"
    )
    p.add_argument(
        "--label-column", metavar="NAME", help="tables: the label column (default: label, if present)"
    )
    _progress_flag(p)
    i = sub.add_parser(
        "index",
        help="adopt existing WebDataset tars: .idx files and a manifest, no copy",
        epilog=INDEX_EXAMPLES,
        formatter_class=raw,
    )
    i.add_argument("shards", metavar="SHARDS", help="a .tar, a list, a brace pattern or a folder of tars")
    i.add_argument(
        "--out", metavar="DIR", help="write .idx files and manifest.json here (default: beside the tars)"
    )
    i.add_argument("--workers", type=int, default=1, metavar="W", help="parallel processes (default: 1)")
    i.add_argument(
        "--label-key", type=_label_key, metavar="KEY", help="cls, or json:FIELD (default: unlabelled)"
    )
    i.add_argument(
        "--classes", type=Path, metavar="FILE", help="class names, one per line (label i = line i)"
    )
    i.add_argument("--split", default="train", help="the manifest split these tars form (default: train)")
    _progress_flag(i)
    m = sub.add_parser(
        "merge", help="one manifest.json from every finished part", epilog=MERGE_EXAMPLES, formatter_class=raw
    )
    m.add_argument("out", metavar="OUT", help="the OUT every part wrote into")
    v = sub.add_parser(
        "verify",
        help="re-read every shard and check it against manifest.json",
        epilog=VERIFY_EXAMPLES,
        formatter_class=raw,
    )
    v.add_argument("out", metavar="OUT", help="folder or fsspec URL holding manifest.json")
    return parser


def shard_config(args: argparse.Namespace) -> ShardConfig:
    """The `shard` flags as a checked config (ValueError names the flag)."""
    return ShardConfig(
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        labels=args.labels,
        resize_short=args.resize_short,
        val_fraction=args.val_fraction,
        seed=args.seed,
    )


def _part(text: str) -> Part:
    try:
        return Part.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--part {text!r}: ")) from None


def _label_key(text: str) -> LabelKey:
    try:
        return LabelKey.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--label-key {text!r}: ")) from None


def _progress_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--progress-every",
        type=float,
        default=60.0,
        metavar="S",
        help="off a terminal: a progress line every S seconds (default: 60; 0: none)",
    )


def _classes(path: Path | None, parser: argparse.ArgumentParser) -> list[str] | None:
    if path is None:
        return None
    try:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        parser.error(f"--classes {path}: {type(e).__name__}: {e}")
    if not names or len(set(names)) != len(names):
        parser.error(f"--classes {path}: need one distinct class name per line")
    return names


def _merge_if_complete(out: str) -> None:
    """The last part to finish writes the manifest; earlier ones say what is still running."""
    fs, root = url_to_fs(out)
    try:
        manifest = merge(fs, root.rstrip("/"))
    except MergeError as e:
        print(f"data_prep: not merged yet: {e}")
        return
    print(f"data_prep merge: every part finished: {manifest['total_samples']} images -> {out}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM ends the run like Ctrl-C: workers stopped, temp files removed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = sys.stderr.isatty()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    quiet_abandoned_tasks()
    try:
        if args.command == "shard":
            try:
                cfg = shard_config(args)
            except ValueError as e:
                parser.error(str(e))  # exits 2
            if args.merge and args.part.count == 1:
                parser.error("--merge goes with --part I/N (a run in one part writes manifest.json itself)")
            columns = Columns(args.path_column, args.image_column, args.label_column)
            summary = shard(args.src, args.out, cfg, args.part, columns, args.progress_every, args.lock_wait)
            print(summary.line())
            if args.merge:
                _merge_if_complete(args.out)
            if summary.images == 0 and summary.rejected:  # a part of more parts than items may be empty
                print(
                    f"data_prep: wrote nothing: all {summary.rejected} images were rejected", file=sys.stderr
                )
                return 1
            return 0
        if args.command == "index":
            summary = index_shards(
                args.shards,
                args.out,
                workers=args.workers,
                label_key=args.label_key,
                classes=_classes(args.classes, parser),
                split=args.split,
                progress_interval_s=args.progress_every,
            )
            print(summary.line())
            return 0
        if args.command == "merge":
            fs, root = url_to_fs(args.out)
            manifest = merge(fs, root.rstrip("/"))
            n_shards = sum(len(s["shards"]) for s in manifest["splits"].values())
            images = manifest["total_samples"]
            parts = manifest["parts"]
            print(f"data_prep merge: {parts} parts, {images} images in {n_shards} shards -> {args.out}")
            return 0 if manifest["total_samples"] else 1
        report = verify(args.out, progress=progress)
        for problem in report.problems:
            print(f"damaged: {problem}", file=sys.stderr)
        print(report.line())
        return 0 if report.ok else 1
    except (SourceError, OutputError, ManifestError, TableError, LabelError, PartBusy, MergeError) as e:
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
