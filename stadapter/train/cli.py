"""Command lines of `stadapter train` and `stadapter eval` (argparse; bad input exits with 2).

    stadapter train --train-data videos/train --val-data videos/val --output-dir runs/k400 [...]
    stadapter train --config run.yaml --epochs 3          # flags override the file
    torchrun --nproc_per_node 2 -m stadapter.cli train ...
    stadapter eval --checkpoint runs/k400 --num-temporal-views 3 --num-spatial-views 3
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .checkpoints import CheckpointError
from .config import ConfigError, TrainConfig, add_arguments, config_from_args


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stadapter train", usage="%(prog)s [--config FILE.yaml] [options]", description="Train ST-Adapters and a head on a frozen ViT over video files.",
        epilog="Every flag is also a key of the --config YAML file (dashes or underscores).")
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; flags given here override it")
    add_arguments(parser)
    return parser


def train_main(argv=None) -> int:
    parser = train_parser()
    args = parser.parse_args(argv)
    from .trainer import train

    try:
        config = config_from_args(args)
        config.check_paths()
        summary = train(config)
    except (ConfigError, CheckpointError) as error:
        parser.error(str(error))
    final = summary["final_eval"]
    if summary["processes"] == 1 or _rank() == 0:
        result = f"top-1 {final['top1']:.2f}%" if final else "no evaluation data"
        print(f"trained {summary['step']} steps at {summary['clips_per_second']:.3g} clips/s "
              f"(peak RSS {summary['peak_rss_mib']:.0f} MiB per process); {result}; "
              f"{summary['skipped_videos']} videos skipped; adapters in {summary['adapters_file']}")
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stadapter eval", usage="%(prog)s --checkpoint PATH [options]",
                                     description="Evaluate a `stadapter train` checkpoint (multi-view test).")
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint folder, or a training output folder (its newest valid checkpoint)")
    parser.add_argument("--data", help="videos to evaluate (default: the run's --val-data)")
    parser.add_argument("--json", help="write the result here as JSON")
    overridable = ("data_root", "num_temporal_views", "num_spatial_views", "test_scale", "batch_size",
                   "num_workers", "device", "amp", "strict", "threads")
    add_arguments(parser, skip=tuple(n for n in TrainConfig.__dataclass_fields__ if n not in overridable))
    return parser


def eval_main(argv=None) -> int:
    parser = eval_parser()
    args = parser.parse_args(argv)
    from .trainer import evaluate_checkpoint

    overrides = {k: v for k, v in vars(args).items() if k not in ("checkpoint", "data", "json")}
    try:
        result = evaluate_checkpoint(args.checkpoint, args.data, **overrides)
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        parser.error(str(error))
    if _rank() == 0:
        print(f"top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% on {result['videos']} videos "
              f"({result['views']} views each); {result['skipped_videos']} skipped")
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
