"""MA-CLIP: multimodal adaptation of a frozen CLIP for few-shot action recognition.

The frozen image ViT (any family `stadapter.backbones.find_backbone` knows) runs block by block
here, from its own frozen parts, with three adapters per block, all AIM-form bottlenecks
(`kernel_t=1`, gelu) run by the fused `st_adapter` op:

1. temporal: the T class tokens of a video attend to each other through the block's frozen
   attention; adapter without skip: `c' = c + A_T(attn_T(ln1(c)))`.
2. multimodal: each frame's L tokens, its `c'` and (support videos) the block's text token
   (the class text through a tuned "text FC", repeated over T) go through the frozen spatial
   attention with an adapter with skip, `Z = Z + A_M(attn(ln1(Z)))`; the first L are kept.
3. joint: an adapter without skip beside the frozen MLP, `x + mlp(ln2(x)) + s * A_J(ln2(x))`.

Frame features are the class tokens after the final norm and the visual projection. A TPCM
layer builds text-guided prototypes; the loss mixes video-text matching (S2T, Q2T) with the
query-to-prototype alignment (Q2S) under any metric of `stadapter.fewshot.metrics`.

Variants: `temporal="st_adapter"` puts a kt = 3 ST-Adapter before each block's attention in
place of the temporal adaptation; `text="bottleneck"` feeds the text FC output to the
multimodal adapter's bottleneck as the op's `cond` (projected by that adapter's own
down-projection) instead of appending a text token.

The adapters live in this module, not in the backbone: the backbone's own forward and state
dict are untouched.

`FramePrototypes` is the text-free baseline: a backbone's per-frame class tokens (ST-Adapters
injected into it or not) compared with mean-over-shots prototypes by a metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones import find_backbone
from .. import set_num_frames
from ..inject import is_adapted
from ..modules import STAdapter
from .metrics import build_metric
from .tpcm import TPCM, prototypes

TEMPORAL = ("attention", "st_adapter")
TEXT = ("token", "bottleneck")


def aim_adapter(dim: int, bottleneck: int, residual: bool, scale: float = 1.0, backend: str = "auto") -> STAdapter:
    """`fc2(gelu(fc1(x)))` on every token (no prefix), as the fused op with kt = 1.

    Initialised as AIM does: the up-projection is zero, so the branch starts at zero; the
    kt = 1 temporal tap is one (the identity) so fc1's gradient is not blocked.
    """
    adapter = STAdapter(dim, bottleneck, kernel_t=1, activation="gelu", prefix_tokens=0, scale=scale,
                        residual=residual, backend=backend)
    with torch.no_grad():
        adapter.conv.weight.fill_(1.0)
        adapter.fc2.weight.zero_()
    return adapter


@dataclass
class EpisodeOutput:
    """What one episode's forward gives the loss and the prediction.

    q2s_distance (queries, way): alignment distance of each query to each prototype.
    q2t_logits (queries, way), s2t_logits (support, way): scaled cosine of the time-averaged
    video feature with each class text; None for models without text.
    """

    q2s_distance: Tensor
    q2t_logits: Tensor | None = None
    s2t_logits: Tensor | None = None


def episode_loss(output: EpisodeOutput, query_targets: Tensor, support_targets: Tensor, alpha: float) -> Tensor:
    """`alpha * (KL_S2T + KL_Q2T) / 2 + (1 - alpha) * CE_Q2S`; the KL to a one-hot target is the
    cross-entropy, so both terms are computed as such. Without text logits: CE_Q2S alone."""
    q2s = F.cross_entropy(-output.q2s_distance, query_targets)
    if output.q2t_logits is None:
        return q2s
    video_text = (F.cross_entropy(output.s2t_logits, support_targets)
                  + F.cross_entropy(output.q2t_logits, query_targets)) / 2
    return alpha * video_text + (1 - alpha) * q2s


def episode_probabilities(output: EpisodeOutput, alpha: float) -> Tensor:
    """`alpha * p_Q2T + (1 - alpha) * p_Q2S` (p_Q2S alone without text): (queries, way)."""
    q2s = (-output.q2s_distance).softmax(dim=-1)
    if output.q2t_logits is None:
        return q2s
    return alpha * output.q2t_logits.softmax(dim=-1) + (1 - alpha) * q2s


def _check_clips(name: str, clips: Tensor) -> None:
    if not isinstance(clips, Tensor) or clips.dim() != 5 or clips.shape[1] != 3:
        shape = tuple(clips.shape) if isinstance(clips, Tensor) else type(clips).__name__
        raise ValueError(f"{name} must be float clips (videos, 3, frames, height, width), got {shape}")


def _check_episode(support: Tensor, query: Tensor, class_text: Tensor, shot: int, text_dim: int | None) -> None:
    _check_clips("support", support)
    _check_clips("query", query)
    if class_text.dim() != 2 or (text_dim is not None and class_text.shape[1] != text_dim):
        raise ValueError(f"class_text must be (way, {text_dim or 'dim'}), got {tuple(class_text.shape)}")
    way = class_text.shape[0]
    if support.shape[0] != way * shot:
        raise ValueError(f"support must hold way * shot = {way} * {shot} clips, got {support.shape[0]}")


class MACLIP(nn.Module):
    """MA-CLIP on a frozen image ViT and a frozen text encoder's features.

    Args:
        backbone: a CLIP (or any) ViT that `stadapter.backbones.find_backbone` supports; frozen.
        text_dim: dim of the frozen text features (512 for CLIP ViT-B text, 384 for MiniLM).
        bottleneck: adapter width; default a quarter of the backbone width.
        temporal: "attention" (the paper) or "st_adapter" (kt = 3 ST-Adapter instead).
        text: "token" (the paper) or "bottleneck" (text FC output as the op's cond).
        metric: a name in `stadapter.fewshot.metrics.METRICS`; `metric_options` go to it.
        alpha: weight of the video-text terms in the loss and the prediction.
        joint_scale: s of the joint adapter.
        tpcm_heads, tpcm_hidden: the TPCM layer's heads and FFN width.
        backend: the fused op's backend for every adapter.

    The frame features are the class tokens after the final norm and the backbone's visual
    projection; they must have `text_dim` channels to be compared with texts, so when the
    backbone has no projection, or one of another width, a tuned linear map to `text_dim`
    follows (`video_projection`).
    """

    text_conditioned = True  # support features depend on the class text

    def __init__(self, backbone: nn.Module, text_dim: int, bottleneck: int | None = None,
                 temporal: str = "attention", text: str = "token", metric: str = "otam",
                 metric_options: dict | None = None, alpha: float = 0.5, joint_scale: float = 0.5,
                 tpcm_heads: int = 8, tpcm_hidden: int = 2048, backend: str = "auto"):
        super().__init__()
        if temporal not in TEMPORAL:
            raise ValueError(f"temporal must be one of {TEMPORAL}, got {temporal!r}")
        if text not in TEXT:
            raise ValueError(f"text must be one of {TEXT}, got {text!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.backbone = backbone
        self.spec = find_backbone(backbone)
        backbone.requires_grad_(False)
        width = self.spec.width
        bottleneck = bottleneck or width // 4
        self.temporal, self.text, self.alpha = temporal, text, alpha
        self.text_dim, self.bottleneck = text_dim, bottleneck

        def temporal_adapter():
            if temporal == "attention":
                return aim_adapter(width, bottleneck, residual=False, backend=backend)
            return STAdapter(width, bottleneck, kernel_t=3, prefix_tokens=self.spec.prefix, backend=backend)

        self.adapters = nn.ModuleList(nn.ModuleDict({
            "temporal": temporal_adapter(),
            "multimodal": aim_adapter(width, bottleneck, residual=True, backend=backend),
            "joint": aim_adapter(width, bottleneck, residual=False, scale=joint_scale, backend=backend),
        }) for _ in self.spec.blocks)
        self.text_fcs = nn.ModuleList(nn.Linear(text_dim, width) for _ in self.spec.blocks)

        projection = self.spec.projection
        feature_dim = width if projection is None else projection.shape[1]
        self.video_projection = nn.Linear(feature_dim, text_dim) if feature_dim != text_dim else None
        self.tpcm = TPCM(text_dim, heads=tpcm_heads, hidden=tpcm_hidden)
        self.metric = build_metric(metric, text_dim, **(metric_options or {}))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: its dropout and norms stay in inference mode
        return self

    def tunable_parameters(self) -> dict[str, Tensor]:
        """Every tensor training changes (the backbone's are frozen), by name."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def _block(self, index: int, x: Tensor, frames: int, text_token: Tensor | None) -> Tensor:
        """One adapted block on batch-first tokens x (videos * frames, L, C)."""
        parts = self.spec.parts(self.spec.blocks[index])
        adapters = self.adapters[index]
        videos, tokens = x.shape[0] // frames, x.shape[1]
        extra = []
        if self.temporal == "attention":
            cls = x[:, 0].unflatten(0, (videos, frames))  # (videos, T, C): each video's class tokens
            # One "frame" of T tokens per video: kt = 1, so the op's frame count is immaterial.
            adapted = adapters["temporal"](parts.attention(parts.norm1(cls)), num_frames=1)
            extra.append((cls + parts.ls1(adapted)).flatten(0, 1)[:, None])
        else:
            x = adapters["temporal"](x, num_frames=frames)
        cond = None
        if text_token is not None:
            if self.text == "token":
                extra.append(text_token.repeat_interleave(frames, dim=0)[:, None])
            else:
                cond = F.linear(text_token, adapters["multimodal"].fc1.weight)
        z = torch.cat([x, *extra], dim=1) if extra else x
        z = z + parts.ls1(adapters["multimodal"](parts.attention(parts.norm1(z)), num_frames=frames, cond=cond))
        x = z[:, :tokens]
        h = parts.norm2(x)
        return x + parts.ls2(parts.mlp(h)) + adapters["joint"](h, num_frames=frames)

    def frame_features(self, clips: Tensor, text: Tensor | None = None) -> Tensor:
        """clips (B, 3, T, H, W), text (B, text_dim) for labelled videos -> (B, T, text_dim)."""
        _check_clips("clips", clips)
        videos, _, frames = clips.shape[:3]
        if text is not None and text.shape != (videos, self.text_dim):
            raise ValueError(f"text must be ({videos}, {self.text_dim}), one feature per video, "
                             f"got {tuple(text.shape)}")
        images = clips.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W), frame-major within a video
        x = self.spec.embed(images)
        for index, text_fc in enumerate(self.text_fcs):
            x = self._block(index, x, frames, None if text is None else text_fc(text))
        features = class_token_features(self.spec, x)
        if self.video_projection is not None:
            features = self.video_projection(features)
        return features.unflatten(0, (videos, frames))

    def _text_logits(self, frames: Tensor, class_text: Tensor) -> Tensor:
        video = F.normalize(frames.mean(dim=1), dim=-1)
        return self.logit_scale.exp().clamp(max=100) * video @ F.normalize(class_text, dim=-1).T

    def support_features(self, clips: Tensor, text: Tensor) -> Tensor:
        """Labelled videos, their class text entering every block and TPCM: (B, 3, T, H, W),
        (B, text_dim) -> (B, 2, T, D), the frame features and their TPCM output stacked.

        Everything per video is computed here, so evaluation can compute it once per video."""
        frames = self.frame_features(clips, text)
        return torch.stack([frames, self.tpcm(frames, text)], dim=1)

    def query_features(self, clips: Tensor) -> Tensor:
        """Unlabelled videos: (B, 3, T, H, W) -> (B, 2, T, D), frame features and TPCM output."""
        frames = self.frame_features(clips)
        return torch.stack([frames, self.tpcm(frames)], dim=1)

    def episode(self, support: Tensor, query: Tensor, class_text: Tensor, shot: int) -> EpisodeOutput:
        """The episode from `support_features` and `query_features`: mean-over-shots prototypes
        of the TPCM outputs, their alignment with the queries', and the video-text logits of the
        frame features."""
        protos = prototypes(support[:, 1], class_text.shape[0], shot)
        return EpisodeOutput(self.metric(query[:, 1], protos), self._text_logits(query[:, 0], class_text),
                             self._text_logits(support[:, 0], class_text))

    def forward(self, support: Tensor, query: Tensor, class_text: Tensor, shot: int) -> EpisodeOutput:
        """One episode.

        Args:
            support: (way * shot, 3, T, H, W) clips, class-major (all shots of class 0 first).
            query: (queries, 3, T, H, W) clips.
            class_text: (way, text_dim) frozen features of the episode's class prompts.
            shot: K.
        """
        _check_episode(support, query, class_text, shot, self.text_dim)
        support_text = class_text.repeat_interleave(shot, dim=0)
        return self.episode(self.support_features(support, support_text), self.query_features(query),
                            class_text, shot)

def class_token_features(spec, tokens: Tensor) -> Tensor:
    """Final norm, class token and visual projection (when the backbone has one): (N, D)."""
    features = spec.final_norm(tokens)[:, 0]
    return features if spec.projection is None else features @ spec.projection


class FramePrototypes(nn.Module):
    """Baseline: per-frame class tokens of `backbone` as it is, a metric over prototypes.

    Inject ST-Adapters first (`stadapter.add_st_adapters`) for the "+ ST-Adapters" baseline;
    without adapters nothing is tunable (the frozen backbone + metric). No text: the loss and
    prediction are Q2S alone (`alpha = 0`).
    """

    alpha = 0.0
    text_conditioned = False

    def __init__(self, backbone: nn.Module, metric: str = "otam", metric_options: dict | None = None):
        super().__init__()
        self.backbone = backbone
        self.spec = find_backbone(backbone)
        self.adapted = any(is_adapted(block) for block in self.spec.blocks)
        dim = self.spec.width if self.spec.projection is None else self.spec.projection.shape[1]
        self.metric = build_metric(metric, dim, **(metric_options or {}))

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen parts stay in inference mode; the adapters have no dropout
        return self

    def tunable_parameters(self) -> dict[str, Tensor]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def frame_features(self, clips: Tensor) -> Tensor:
        """clips (B, 3, T, H, W) -> (B, T, D)."""
        _check_clips("clips", clips)
        videos, _, frames = clips.shape[:3]
        if self.adapted:
            set_num_frames(self.backbone, frames)
        tokens = self.spec.run_blocks(self.spec.embed(clips.transpose(1, 2).flatten(0, 1)))
        return class_token_features(self.spec, tokens).unflatten(0, (videos, frames))

    def support_features(self, clips: Tensor, text: Tensor | None = None) -> Tensor:
        """Frame features; no text enters (the same as `query_features`)."""
        return self.frame_features(clips)

    def query_features(self, clips: Tensor) -> Tensor:
        return self.frame_features(clips)

    def episode(self, support_frames: Tensor, query_frames: Tensor, class_text: Tensor, shot: int) -> EpisodeOutput:
        """Mean-over-shots prototypes and the metric; `class_text` only gives the way."""
        return EpisodeOutput(self.metric(query_frames, prototypes(support_frames, class_text.shape[0], shot)))

    def forward(self, support: Tensor, query: Tensor, class_text: Tensor, shot: int) -> EpisodeOutput:
        """One episode (same arguments as `MACLIP.forward`)."""
        _check_episode(support, query, class_text, shot, None)
        return self.episode(self.frame_features(support), self.frame_features(query), class_text, shot)
