"""`python -m bench NAME [args]`: run one benchmark module, `bench/NAME.py`, through its `main(argv)`."""

import importlib
import sys

BENCHMARKS = ("prep", "loader", "loss", "step", "comm", "gpu", "quality")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        names = ",".join(BENCHMARKS)
        print(f"usage: python -m bench {{{names}}} [args...]  (each has --help)", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{argv[0]}")
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
