"""Few-shot action recognition on frozen image ViTs: MA-CLIP, alignment metrics, episodes.

- `MACLIP`: temporal, multimodal and joint adapters (the fused op), TPCM, video-text loss.
- `FramePrototypes`: the text-free baseline (frozen or ST-adapted backbone + a metric).
- `metrics`: `otam`, `bi_mhm`, `mean_cosine`, `TRX`, `build_metric(name, dim)`.
- `EpisodeSampler`, `read_split`, `read_splits`: N-way K-shot episodes over class-disjoint splits.
- `SentenceEncoder` (offline default), `CLIPTextEncoder`, `prompts`: frozen class-name features.
- `meta_train`, `evaluate`: training and test accuracy with its 95% confidence interval.

The command line is `stadapter fewshot train|eval|demo` (`stadapter.fewshot.cli`); see docs/fewshot.md.
"""

from .episodes import Episode, EpisodeSampler, Split, check_disjoint, read_split, read_splits
from .metrics import METRICS, TRX, bi_mhm, build_metric, mean_cosine, otam
from .model import MACLIP, EpisodeOutput, FramePrototypes, episode_loss, episode_probabilities
from .text import CLIPTextEncoder, SentenceEncoder, TextEncoder, build_text_encoder, prompts
from .tpcm import TPCM, prototypes
from .train import TrainConfig, evaluate, meta_train, video_features

__all__ = [
    "CLIPTextEncoder", "Episode", "EpisodeOutput", "EpisodeSampler", "FramePrototypes", "MACLIP", "METRICS",
    "SentenceEncoder", "Split", "TPCM", "TRX", "TextEncoder", "TrainConfig", "bi_mhm", "build_metric",
    "build_text_encoder", "check_disjoint", "episode_loss", "episode_probabilities", "evaluate", "mean_cosine",
    "meta_train", "otam", "prompts", "prototypes", "read_split", "read_splits", "video_features",
]
