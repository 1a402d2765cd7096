"""`STAdapter`: the drop-in replacement for the official ST-Adapter module.

Its parameters have the official names and shapes (`fc1`, `conv`, `fc2`), so an official
state dict loads with `strict=True`; its forward calls the fused `st_adapter` op.
"""

from __future__ import annotations

import torch
from torch import nn

from stadapter_kernels import ACTIVATIONS, LAYOUTS, st_adapter


class STAdapter(nn.Module):
    """x -> x + scale * fc2(act(conv_t(fc1(x)))) on the patch tokens of every frame.

    Args:
        dim: channels C of the tokens.
        bottleneck: channels Ca of the adapter (384 for the official ViT-B/16 models).
        kernel_t: odd temporal kernel size kt (1 gives the plain AIM-style bottleneck adapter).
        activation: one of `stadapter_kernels.ACTIVATIONS` ("identity" in the official module).
        prefix_tokens: leading tokens per frame passed through unchanged (class/register tokens).
        layout: "nlc" (B*T, L, C), "lnc" (L, B*T, C) or "btlc" (B, T, L, C).
        scale: multiplier of the adapter branch.
        residual: True (the official module) returns x + branch; False the branch alone (zero on
            prefix tokens), for adapters added to another stream (AIM / MA-CLIP style).
        backend: "auto", "triton", "cpp" or "reference".

    Initialised like the official module: conv weight and bias and both fc biases are zero, so
    a new adapter is the identity map.
    """

    def __init__(self, dim: int, bottleneck: int, kernel_t: int = 3, activation: str = "identity",
                 prefix_tokens: int = 1, layout: str = "nlc", scale: float = 1.0, residual: bool = True,
                 backend: str = "auto"):
        super().__init__()
        for name, value in (("dim", dim), ("bottleneck", bottleneck), ("kernel_t", kernel_t)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if kernel_t % 2 == 0:
            raise ValueError(f"kernel_t must be odd so the temporal conv is centred, got {kernel_t}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.dim, self.bottleneck, self.kernel_t = dim, bottleneck, kernel_t
        self.activation, self.prefix_tokens, self.layout = activation, prefix_tokens, layout
        self.scale, self.residual, self.backend = scale, residual, backend
        self.fc1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size=(kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0),
                              groups=bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Official initialisation: default fc weights, everything else zero (identity adapter)."""
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        for tensor in (self.conv.weight, self.conv.bias, self.fc1.bias, self.fc2.bias):
            nn.init.zeros_(tensor)

    def forward(self, x: torch.Tensor, num_frames: int | None = None, cond: torch.Tensor | None = None):
        """Adapt tokens `x` in `self.layout`; `num_frames` is required for "nlc" and "lnc".

        `cond` (B, Ca), optional, shifts the bottleneck per video (text-conditioned adapters).
        """
        return st_adapter(
            x, self.fc1.weight, self.fc1.bias, self.conv.weight, self.conv.bias, self.fc2.weight, self.fc2.bias,
            num_frames=num_frames, prefix=self.prefix_tokens, activation=self.activation, cond=cond,
            scale=self.scale, residual=self.residual, layout=self.layout, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, bottleneck={self.bottleneck}, kernel_t={self.kernel_t}, "
                f"activation={self.activation!r}, prefix_tokens={self.prefix_tokens}, layout={self.layout!r}, "
                f"scale={self.scale}, residual={self.residual}, backend={self.backend!r}")
