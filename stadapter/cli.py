"""The `stadapter` console script: `stadapter COMMAND [options]`, `stadapter COMMAND --help`.

Each command's module is imported only when it runs, so `stadapter --help` loads no torch;
its own parser owns its options (and --help). `stadapter bench` runs the repository's
benchmarks/, installed as `stadapter.bench` (the same as `python -m benchmarks`).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, function taking argv and returning the exit code, one-line help)
COMMANDS = {
    "bench": ("stadapter.bench.runner", "main", "run the benchmark suite"),
    "train": ("stadapter.train.cli", "train_main", "train ST-Adapters on video files (DDP through torchrun)"),
    "eval": ("stadapter.train.cli", "eval_main", "evaluate a training checkpoint (multi-view test)"),
    "demo": ("stadapter.demo.run", "main", "the offline moving-digits demo: linear probe vs ST-Adapters"),
    "fewshot": ("stadapter.fewshot.cli", "main", "few-shot action recognition: MA-CLIP train, eval and demo"),
}
# A source checkout on PYTHONPATH, not installed (e.g. the lent GPU machine), has benchmarks/ only.
FALLBACK_MODULES = {"stadapter.bench.runner": "benchmarks.runner"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stadapter", description="Fused spatio-temporal adapters (ST-Adapter).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, _, help_text) in COMMANDS.items():
        commands.add_parser(name, add_help=False, help=f"{help_text} (options: stadapter {name} --help)")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    module, function, _ = COMMANDS[args.command]
    try:
        loaded = importlib.import_module(module)
    except ImportError:
        if module not in FALLBACK_MODULES:
            raise
        loaded = importlib.import_module(FALLBACK_MODULES[module])
    return getattr(loaded, function)(rest)


if __name__ == "__main__":
    sys.exit(main())
