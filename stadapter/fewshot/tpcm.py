"""Text-guided prototype construction (TPCM): one layer shared by support and query videos.

Support videos know their class, so the class text guides their frames:
`q = F_S + F_T` (text repeated over T), `k = v = [F_T; F_S]` ((T + 1) x D),
`H = MHA(q, k, v) + q`, `out = FFN(H) + H`. Query videos have no label and go through the same
layer as self-attention, `H = MHA(F_Q, F_Q, F_Q) + F_Q`, then the same FFN. K-shot prototypes
are the mean over shots of the support outputs (`prototypes`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TPCM(nn.Module):
    """One TPCM layer for `dim`-channel frame features (8 heads, FFN hidden 2048 in the paper)."""

    def __init__(self, dim: int, heads: int = 8, hidden: int = 2048, dropout: float = 0.1):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.dim = dim

    def forward(self, frames: Tensor, text: Tensor | None = None) -> Tensor:
        """frames (B, T, dim); text (B, dim) for support videos, None for queries -> (B, T, dim)."""
        if frames.dim() != 3 or frames.shape[-1] != self.dim:
            raise ValueError(f"frames must be (videos, frames, {self.dim}), got {tuple(frames.shape)}")
        if text is None:
            query = keys = frames
        else:
            if text.shape != (frames.shape[0], self.dim):
                raise ValueError(f"text must be ({frames.shape[0]}, {self.dim}) (one per video), "
                                 f"got {tuple(text.shape)}")
            query = frames + text[:, None]
            keys = torch.cat([text[:, None], frames], dim=1)
        hidden = self.attention(query, keys, keys, need_weights=False)[0] + query
        return self.ffn(hidden) + hidden


def prototypes(support: Tensor, way: int, shot: int) -> Tensor:
    """Class prototypes: support (way * shot, T, D) ordered class-major -> mean over shots (way, T, D)."""
    if support.shape[0] != way * shot:
        raise ValueError(f"support must hold way * shot = {way * shot} videos, got {support.shape[0]}")
    return support.unflatten(0, (way, shot)).mean(dim=1)
