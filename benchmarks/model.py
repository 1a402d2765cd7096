"""The whole-model mode: a ViT-B/16-shaped frozen timm backbone with a pre-MLP adapter per block.

Random weights (pretrained=False, nothing is downloaded). Each block is wrapped so the adapter
acts on the residual stream before the MLP, as the official ST-Adapter does; injection into
backbones proper belongs to `stadapter`, this wrapper exists only to time the adapters in context.
"""

from __future__ import annotations

import torch
from torch import nn

import stadapter_kernels
from stadapter import STAdapter

from . import config
from .providers import Case, OfficialAdapter, Shape, Unavailable, compiled, fused_reason, init_adapter_


class AdaptedBlock(nn.Module):
    """timm Block with an adapter on the residual stream between attention and MLP."""

    def __init__(self, block: nn.Module, adapter: nn.Module, num_frames: int):
        super().__init__()
        self.block, self.adapter, self.num_frames = block, adapter, num_frames

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = self.adapter(x, self.num_frames)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


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
    """The backbone, frozen, with `provider`'s adapter in every block (a per-channel shift for `floor`)."""
    from timm.models.vision_transformer import VisionTransformer

    width = config.WIDTHS[cfg.width]
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=cfg.depth,
                            num_heads=config.VIT_HEADS[cfg.width], num_classes=0)
    vit.requires_grad_(False)
    shared = None
    blocks = []
    for i, block in enumerate(vit.blocks):
        if provider == "floor":
            adapter = ShiftAdapter(width)
        elif provider == "official":
            adapter = OfficialAdapter(width, cfg.bottleneck)
        elif provider == "compile":
            shared = shared or compiled(_reference_adapter, notes)
            adapter = CompiledAdapter(shared, width, cfg.bottleneck)
        else:
            adapter = STAdapter(width, cfg.bottleneck, backend="auto" if provider == "fused" else "reference")
        blocks.append(AdaptedBlock(block, init_adapter_(adapter, seed=i), cfg.frames))
    vit.blocks = nn.Sequential(*blocks)
    return vit.to(device, dtype)


def model_case(provider: str, mode: str, cfg: config.ModelConfig, dtype: torch.dtype, device: str) -> Case:
    """One training step (adapters trainable, backbone frozen) or one inference pass."""
    notes = ["adapters replaced by a per-channel shift"] if provider == "floor" else []
    notes += [f"{cfg.depth} of 12 blocks" if cfg.depth < 12 else "12 blocks",
             f"{cfg.clips} clip(s) x {cfg.frames} frames"]
    clips = torch.randn(cfg.clips * cfg.frames, 3, 224, 224, generator=torch.Generator().manual_seed(3))
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
