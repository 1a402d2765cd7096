"""The `stadapter` console script. `stadapter bench [options]` runs the benchmark suite
(the repository's benchmarks/, installed as `stadapter.bench`; the same as `python -m benchmarks`); `stadapter bench --help` lists its options."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stadapter", description="Fused spatio-temporal adapters (ST-Adapter).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("bench", add_help=False,
                        help="run the benchmark suite (options: stadapter bench --help)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "bench":
        # Imported here so `stadapter --help` does not load torch; every option goes to the runner,
        # whose parser owns them (and --help).
        try:
            from stadapter.bench.runner import main as bench_main  # installed: benchmarks/ is stadapter.bench
        except ImportError:  # a source checkout on PYTHONPATH, not installed (e.g. the lent GPU machine)
            from benchmarks.runner import main as bench_main

        return bench_main(rest)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
