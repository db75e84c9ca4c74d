"""`python -m bench NAME [args]`: run one benchmark module, `bench/NAME.py`, through its `main(argv)`."""

import importlib
import sys

BENCHMARKS = ("prep", "loader", "loss", "step", "comm", "gpu", "quality", "stream")


def main(argv: list[str]) -> int:
    usage = f"usage: python -m bench {{{','.join(BENCHMARKS)}}} [args...]  (each has --help)"
    if argv[:1] in (["-h"], ["--help"]):
        print(usage)
        return 0
    if not argv or argv[0] not in BENCHMARKS:
        print(usage, file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
