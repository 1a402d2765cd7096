"""`stadapter demo`: what adapters add to a frozen image model, offline, in minutes on a CPU.

1. Write a moving-digits video set as mp4 files (classes told apart only by the order of
   their frames; `stadapter.demo.digits`).
2. Pretrain a tiny ViT on single frames (digit identity) and freeze it.
3. Train, with `stadapter.train.train` on those files, (a) a linear probe on the temporal mean
   of the frozen features and (b) the frozen ViT with ST-Adapters.
4. Print both accuracies, write a JSON of the results and a PNG of the learning curves.

The probe sees a bag of frames, which is the same for every class of a time-reversed pair,
so it stays near chance; the adapters' temporal convolution sees the order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .digits import MotionClass, write_moving_digits
from .frame_vit import TIMM_NAME, FrameViTConfig, pretrain_frame_vit


@dataclass
class DemoConfig:
    """Sizes of the demo run (the defaults are the full run; `TINY` is the CI run)."""

    # Four classes over one horizontal sweep, each spreading its frames evenly over it.
    motions: tuple[str, ...] = ("right", "left", "right and back", "left and back")
    train_videos: int = 120  # per class
    test_videos: int = 40  # per class
    video_frames: int = 16
    clip_frames: int = 8
    size: int = 32
    digit_size: int = 16
    vit: FrameViTConfig = field(default_factory=FrameViTConfig)
    pretrain_steps: int = 200
    pretrain_batch: int = 64
    bottleneck: int = 64
    epochs: int = 10
    probe_epochs: int = 5
    batch_size: int = 16
    lr: float = 2e-3
    probe_lr: float = 1e-2
    # One process decodes while one torch thread computes: on a 2-core machine that beats two
    # threads, whose OpenMP spin-waits lose badly whenever the cores are shared.
    num_workers: int = 1
    threads: int | None = 1
    seed: int = 0


TINY = DemoConfig(motions=("right", "left"), train_videos=8, test_videos=4, video_frames=8, clip_frames=4,
                  vit=FrameViTConfig(embed_dim=32, depth=2, num_heads=2), pretrain_steps=5, pretrain_batch=16,
                  bottleneck=16, epochs=1, probe_epochs=1, batch_size=8, num_workers=0)


def train_config(demo: DemoConfig, output: Path, adapters: bool, weights: Path):
    """The `stadapter train` settings of one demo model (also written to the JSON)."""
    from stadapter.train import TrainConfig

    return TrainConfig(
        train_data=str(output / "data" / "train"), val_data=str(output / "data" / "test"),
        num_frames=demo.clip_frames, crop_size=demo.size, train_scale=(demo.size, demo.size), flip=False,
        backbone=TIMM_NAME, backbone_kwargs=demo.vit.timm_kwargs(), backbone_weights=str(weights),
        adapters=adapters, positions=("pre_attn", "pre_mlp"), bottleneck=demo.bottleneck, dropout=0.0,
        epochs=demo.epochs if adapters else demo.probe_epochs, batch_size=demo.batch_size,
        lr=demo.lr if adapters else demo.probe_lr, warmup_epochs=0.5, weight_decay=0.0 if not adapters else 0.05,
        num_workers=demo.num_workers, threads=demo.threads, seed=demo.seed,
        output_dir=str(output / ("adapters" if adapters else "probe")), auto_resume=False, save_every=0,
        keep_checkpoints=1, log_every=1)


def _curves(path: Path) -> dict:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    return {"epoch": [r["epoch"] for r in train], "loss": [r["loss"] for r in train],
            "eval_epoch": [r["epoch"] for r in evals], "eval_top1": [r["top1"] for r in evals]}


def plot(curves: dict, chance: float, path: Path) -> None:
    """Training loss and test accuracy per epoch of both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        loss_axes.plot(curve["epoch"], curve["loss"], label=name, alpha=0.8)
        accuracy_axes.plot(curve["eval_epoch"], curve["eval_top1"], marker="o", label=name)
    accuracy_axes.axhline(chance, color="grey", linestyle="--", label="chance")
    loss_axes.set(xlabel="epoch", ylabel="training loss", title="training loss")
    accuracy_axes.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy", ylim=(0, 100))
    for axes in (loss_axes, accuracy_axes):
        axes.legend()
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(demo: DemoConfig, output: str | os.PathLike, log=print) -> dict:
    """The whole demo; returns the results written to `output/results.json`."""
    import torch
    from safetensors.torch import save_file

    from stadapter.train import train

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if demo.threads:
        torch.set_num_threads(demo.threads)
    times = {}
    start = time.perf_counter()
    classes = [MotionClass(m) for m in demo.motions]
    for split, count, seed in (("train", demo.train_videos, demo.seed), ("test", demo.test_videos, demo.seed + 1)):
        write_moving_digits(str(output / "data" / split), classes, count, num_frames=demo.video_frames,
                            size=demo.size, digit_size=demo.digit_size, split=split, seed=seed)
    times["write_videos"] = time.perf_counter() - start
    log(f"wrote {len(classes) * (demo.train_videos + demo.test_videos)} mp4 videos of {len(classes)} classes "
        f"({', '.join(c.name for c in classes)}) in {times['write_videos']:.0f} s")

    start = time.perf_counter()
    vit, pretrain = pretrain_frame_vit(demo.vit, steps=demo.pretrain_steps, batch_size=demo.pretrain_batch,
                                       digit_size=demo.digit_size, seed=demo.seed)
    weights = output / "frame_vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(weights))
    times["pretrain"] = time.perf_counter() - start
    log(f"pretrained the frame ViT on single frames: digit accuracy {100 * pretrain['test_accuracy']:.1f}% "
        f"in {times['pretrain']:.0f} s")

    summaries, curves, configs = {}, {}, {}
    for name, adapters in (("linear probe", False), ("ST-Adapters", True)):
        config = train_config(demo, output, adapters, weights)
        start = time.perf_counter()
        summaries[name] = train(config)
        times[name] = time.perf_counter() - start
        curves[name] = _curves(Path(config.output_dir) / "metrics.jsonl")
        configs[name] = config.to_dict()
        log(f"{name}: test top-1 {summaries[name]['final_eval']['top1']:.1f}% "
            f"({summaries[name]['trainable_parameters']} trainable parameters, {times[name]:.0f} s)")
    chance = 100.0 / len(classes)
    plot(curves, chance, output / "curves.png")
    results = {
        "accuracy": {name: s["final_eval"]["top1"] for name, s in summaries.items()},
        "chance": chance, "frame_vit_digit_accuracy": 100 * pretrain["test_accuracy"],
        "seconds": {**times, "total": sum(times.values())},
        "classes": [c.name for c in classes],
        "sizes": {"train_videos": demo.train_videos * len(classes), "test_videos": demo.test_videos * len(classes),
                  "trainable_parameters": {n: s["trainable_parameters"] for n, s in summaries.items()}},
        "demo_config": asdict(demo), "train_configs": configs, "curves": curves,
        "clips_per_second": {n: s["clips_per_second"] for n, s in summaries.items()},
        "torch_threads": torch.get_num_threads(),
    }
    (output / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="stadapter demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="runs/demo", help="folder for the videos, models and results "
                                                              "(default: runs/demo)")
    parser.add_argument("--json", default=None, help="also write the results JSON here")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run with tiny sizes (for CI)")
    for name in ("train_videos", "test_videos", "epochs", "probe_epochs", "pretrain_steps", "threads", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                            help=f"override {name} (default: {getattr(DemoConfig(), name)})")
    args = parser.parse_args(argv)
    demo = TINY if args.tiny else DemoConfig()
    overrides = {f.name: getattr(args, f.name) for f in fields(DemoConfig)
                 if getattr(args, f.name, None) is not None}
    for name, value in overrides.items():
        if value < (0 if name == "seed" else 1):
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    demo = replace(demo, **overrides)
    results = run(demo, args.output)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
    accuracy = results["accuracy"]
    print(f"\n{'model':<14} {'test top-1':>10}\n{'linear probe':<14} {accuracy['linear probe']:>9.1f}%\n"
          f"{'ST-Adapters':<14} {accuracy['ST-Adapters']:>9.1f}%\nchance {results['chance']:.1f}%, "
          f"total {results['seconds']['total']:.0f} s; results in {Path(args.output) / 'results.json'}, "
          f"curves in {Path(args.output) / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
