"""The whole-model mode: a ViT-B/16-shaped frozen timm backbone made a video model by `VideoViT`,
with a pre-MLP adapter in every block, as the official ST-Adapter has it.

Random weights (pretrained=False, nothing is downloaded). Every provider's model is built by
`stadapter.models.VideoViT` (so by `add_st_adapters`); the providers then differ only in the
module that sits in each block's adapter slot: the fused or reference `STAdapter`, the official
module's data flow, one compiled function, or a per-channel shift (the floor).
"""

from __future__ import annotations

import torch
from torch import nn

import stadapter_kernels
from stadapter import STAdapter
from stadapter.inject import CHILD_NAMES, adapted_blocks
from stadapter.models import VideoViT

from . import config
from .providers import Case, OfficialAdapter, Shape, Unavailable, compiled, fused_reason, init_adapter_

NUM_CLASSES = 400  # Kinetics-400's head


def _reference_adapter(x, num_frames, *params):
    return stadapter_kernels.st_adapter(x, *params, num_frames=num_frames, backend="reference")


class ShiftAdapter(nn.Module):
    """The floor's stand-in adapter: a trainable per-channel shift. A training step then has the
    same backward path through the frozen blocks as with real adapters, and no adapter math."""

    def __init__(self, dim: int):
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return x + self.shift


class CompiledAdapter(STAdapter):
    """STAdapter whose op call goes through one compiled function shared by every block: the
    weights are its arguments, so all blocks reuse one graph."""

    def __init__(self, compiled_fn, dim: int, bottleneck: int):
        super().__init__(dim, bottleneck, backend="reference")
        self.compiled_fn = compiled_fn

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return self.compiled_fn(x, num_frames, self.fc1.weight, self.fc1.bias, self.conv.weight, self.conv.bias,
                                self.fc2.weight, self.fc2.bias)


def build_model(provider: str, cfg: config.ModelConfig, dtype: torch.dtype, device: str,
                notes: list[str]) -> nn.Module:
    """The frozen backbone as a VideoViT with `provider`'s module in every adapter slot."""
    from timm.models.vision_transformer import VisionTransformer

    width = config.WIDTHS[cfg.width]
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=cfg.depth,
                            num_heads=config.VIT_HEADS[cfg.width], num_classes=0, pre_norm=True)
    backend = "auto" if provider == "fused" else "reference"
    model = VideoViT(vit, NUM_CLASSES, cfg.frames, bottleneck=cfg.bottleneck, backend=backend)
    shared = compiled(_reference_adapter, notes) if provider == "compile" else None
    for index, block in adapted_blocks(model):
        slot = CHILD_NAMES["pre_mlp"]
        if provider == "floor":
            adapter = ShiftAdapter(width)
        elif provider == "official":
            adapter = OfficialAdapter(width, cfg.bottleneck)
        elif provider == "compile":
            adapter = CompiledAdapter(shared, width, cfg.bottleneck)
        else:
            adapter = getattr(block, slot)
        setattr(block, slot, init_adapter_(adapter, seed=index))
    return model.to(device, dtype)


def model_case(provider: str, mode: str, cfg: config.ModelConfig, dtype: torch.dtype, device: str) -> Case:
    """One training step (adapters trainable, backbone frozen) or one inference pass."""
    notes = ["adapters replaced by a per-channel shift"] if provider == "floor" else []
    notes += [f"{cfg.depth} of 12 blocks" if cfg.depth < 12 else "12 blocks",
             f"{cfg.clips} clip(s) x {cfg.frames} frames"]
    clips = torch.randn(cfg.clips, 3, cfg.frames, 224, 224, generator=torch.Generator().manual_seed(3))
    clips = clips.to(device, dtype)
    width = config.WIDTHS[cfg.width]
    backend = {"official": "torch (nn.Linear, nn.Conv3d)", "reference": "reference",
               "compile": "inductor(reference)", "floor": "backbone alone"}.get(provider)
    if provider == "fused":
        probe = torch.empty(cfg.clips * cfg.frames, config.TOKENS, width, device=device, dtype=dtype)
        adapter = STAdapter(width, cfg.bottleneck).to(device, dtype)
        explanation = stadapter_kernels.explain(
            probe, adapter.fc1.weight, adapter.fc1.bias, adapter.conv.weight, adapter.conv.bias,
            adapter.fc2.weight, adapter.fc2.bias, num_frames=cfg.frames)
        if explanation.backend not in ("triton", "cpp"):
            raise Unavailable(fused_reason(explanation))
        backend = explanation.backend
    model = build_model(provider, cfg, dtype, device, notes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    if mode == "model_infer":
        model.eval()

        def run():
            with torch.no_grad():
                return model(clips)
        return Case(run=run, backend=backend, notes=notes)

    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def run():
        out = model(clips)
        out.float().square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return Case(run=run, saved=lambda: model(clips), backend=backend, notes=notes,
                existing=[clips, *model.parameters()])


def model_shape(cfg: config.ModelConfig) -> Shape:
    """The adapter shape inside the model, for labels and token counts."""
    return Shape(B=cfg.clips, T=cfg.frames, L=config.TOKENS, C=config.WIDTHS[cfg.width], Ca=cfg.bottleneck)
