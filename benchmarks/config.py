"""Every number the suite is configured by: sweeps, default shapes, model sizes, roofline peaks.

One source of truth: the runner, the pytest-benchmark wrappers, the roofline and the README
all read these tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: Providers in table order. `fused` is the reference point of the ratios, `floor` the lower bound.
PROVIDERS = ("official", "reference", "compile", "fused", "floor")
#: Micro modes time one adapter; model modes time a ViT with an adapter in every block.
MICRO_MODES = ("forward", "forward_backward")
MODEL_MODES = ("model_train", "model_infer")
MODES = MICRO_MODES + MODEL_MODES

#: Transformer widths C swept, by name.
WIDTHS = {"vit-b": 768, "vit-l": 1024}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Tokens per frame (ViT-*/16 at 224 px: 14 x 14 patches and a class token), prefix and kernel.
TOKENS = 197
PREFIX = 1
KERNEL_T = 3
#: Frames per micro batch (B * T): B = max(1, frames // T), so the work stays about constant.
FRAMES_PER_BATCH = {"cpu": 16, "cuda": 128}


@dataclass(frozen=True)
class Sweep:
    """The axes of a sweep; micro cases are their product, model cases one per dtype."""

    T: tuple[int, ...]
    ca: tuple[int, ...]
    width: tuple[str, ...]
    dtype: tuple[str, ...]


FULL = {
    "cpu": Sweep(T=(8, 16, 32), ca=(64, 128, 384), width=("vit-b", "vit-l"), dtype=("float32", "bfloat16")),
    "cuda": Sweep(T=(8, 16, 32), ca=(64, 128, 384), width=("vit-b", "vit-l"),
                  dtype=("float32", "bfloat16", "float16")),
}
#: `--quick`: the official ViT-B/16 adapter (Ca = 384, 8 frames) only; under 3 minutes on 2 CPU cores.
QUICK = {
    "cpu": Sweep(T=(8,), ca=(384,), width=("vit-b",), dtype=("float32", "bfloat16")),
    "cuda": Sweep(T=(8, 16), ca=(384,), width=("vit-b",), dtype=("float32", "bfloat16")),
}


@dataclass(frozen=True)
class Repeats:
    """Timed round-robin rounds per provider and untimed warmup rounds (on top of the untimed
    first call every provider makes); the model modes, a hundred times the work of one adapter,
    get fewer."""

    warmup: int
    repeats: int
    model_warmup: int
    model_repeats: int


REPEATS = {"quick": Repeats(warmup=1, repeats=10, model_warmup=0, model_repeats=5),
           "full": Repeats(warmup=3, repeats=30, model_warmup=2, model_repeats=10)}


@dataclass(frozen=True)
class ModelConfig:
    """The whole-model mode: a ViT-B/16-shaped frozen backbone with a pre-MLP adapter per block."""

    depth: int
    clips: int  # videos per batch
    frames: int = 8
    bottleneck: int = 384
    width: str = "vit-b"


#: Batch sized to the device; --quick on CPU keeps 2 of the 12 blocks so the step takes about a second.
MODEL = {
    ("cpu", "quick"): ModelConfig(depth=2, clips=1),
    ("cpu", "full"): ModelConfig(depth=12, clips=1),
    ("cuda", "quick"): ModelConfig(depth=12, clips=8),
    ("cuda", "full"): ModelConfig(depth=12, clips=16),
}
VIT_HEADS = {"vit-b": 12, "vit-l": 16}

#: torch.compile mode of the `compile` provider; the runner falls back to "default" (and says so).
COMPILE_MODE = "max-autotune-no-cudagraphs"


@dataclass(frozen=True)
class Roofline:
    """Peaks of the modelled machine: HBM bytes/s and dense FLOP/s per dtype."""

    name: str
    bandwidth: float
    flops: dict


#: H100 SXM as modelled here: 3.0 TB/s, 790 TFLOP/s dense bf16/fp16, 495 TFLOP/s TF32 (when
#: torch allows TF32 matmuls), else ~67 TFLOP/s fp32 on the CUDA cores.
H100 = Roofline(name="H100", bandwidth=3.0e12,
                flops={"bfloat16": 790e12, "float16": 790e12, "tf32": 495e12, "float32": 67e12})
