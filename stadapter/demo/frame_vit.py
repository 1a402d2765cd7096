"""The demo's image model: a tiny timm ViT pretrained on single moving-digits frames.

It plays the part CLIP plays for real video: an image model that knows what is in a frame
(which digit, where) and nothing about time. Random init, then a few hundred steps of digit
classification on single frames with the digit anywhere on the canvas, on the CPU.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from stadapter.data import normalize_clips

from .digits import random_frames

# The registered timm name the frame ViT is built from; `FrameViTConfig.timm_kwargs` overrides
# its sizes, so `stadapter train --backbone` can rebuild the same model by name.
TIMM_NAME = "vit_tiny_patch16_224"


@dataclass
class FrameViTConfig:
    """Sizes of the frame ViT (a timm `VisionTransformer`)."""

    img_size: int = 32
    patch_size: int = 8
    embed_dim: int = 96
    depth: int = 3
    num_heads: int = 4
    mlp_ratio: float = 2.0

    def timm_kwargs(self) -> dict:
        """Keyword arguments for `timm.create_model(TIMM_NAME, ...)`."""
        return asdict(self)


def build_frame_vit(config: FrameViTConfig, num_classes: int = 10) -> nn.Module:
    import timm

    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=num_classes, **config.timm_kwargs())


def frames_to_input(frames: np.ndarray) -> torch.Tensor:
    """uint8 frames (N, H, W, 3) -> normalised float (N, 3, H, W), as the video pipeline does."""
    clips = torch.from_numpy(frames).permute(0, 3, 1, 2)[:, :, None]  # (N, 3, 1, H, W)
    return normalize_clips(clips)[:, :, 0]


def pretrain_frame_vit(config: FrameViTConfig | None = None, steps: int = 400, batch_size: int = 128,
                       lr: float = 2e-3, digit_size: int = 16, seed: int = 0, eval_frames: int = 1000,
                       log=None) -> tuple[nn.Module, dict]:
    """Train a frame ViT to tell digits on single frames; returns it (classifier head removed,
    `num_classes=0`) and a summary {"test_accuracy", "seconds", "steps", ...}.

    Frames are drawn fresh each step from the "train" handwriting split; the accuracy is on
    `eval_frames` frames of the "test" split. `log(step, loss)` is called every 50 steps.
    """
    config = config or FrameViTConfig()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = build_frame_vit(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        frames, digits = random_frames(batch_size, config.img_size, digit_size, rng, "train")
        loss = nn.functional.cross_entropy(model(frames_to_input(frames)), torch.from_numpy(digits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(step, float(loss.detach()))
    model.eval()
    frames, digits = random_frames(eval_frames, config.img_size, digit_size, np.random.default_rng(seed + 1), "test")
    with torch.no_grad():
        accuracy = float((model(frames_to_input(frames)).argmax(1).numpy() == digits).mean())
    model.reset_classifier(0)
    return model, {"test_accuracy": accuracy, "seconds": time.perf_counter() - start, "steps": steps,
                   "batch_size": batch_size, "config": asdict(config)}
