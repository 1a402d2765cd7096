"""Video models on a frozen image ViT: `VideoViT` (the official ST-Adapter classifier).

Frames go through the backbone as one (B*T) batch; the class token of the last block is
averaged over T, then the backbone's final norm, dropout and a linear head, in the official
order `fc(dropout(ln_post(mean_t(cls))))`. The backbone is the user's own model, with adapters
injected by `add_st_adapters`; `from_official` loads the official ST-Adapter release.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .backbones import Backbone, find_backbone
from .checkpoint import (AdapterFileError, build_timm_clip_vit, check_fits, official_adapter_key,
                         read_untrusted_weights, split_official_checkpoint)
from .inject import CHILD_NAMES, adapted_blocks, add_st_adapters, adapter_config, set_num_frames


class VideoViT(nn.Module):
    """Clips (B, 3, T, H, W) -> logits (B, num_classes) on a frozen ViT with ST-Adapters.

    Args:
        backbone: a timm, open_clip or OpenAI-CLIP VisionTransformer (adapted in place). One
            that already has adapters is used as it is.
        num_classes: outputs of the head.
        num_frames: T, the frames per clip (`num_frames` can be changed later, e.g. for testing
            with more frames: there is no temporal embedding).
        dropout: before the head (official: 0.5).
        adapters: False for the frozen backbone with a trainable head only (a linear probe on
            the temporal mean of the class token).
        **adapter_args: `add_st_adapters` options (positions, layers, bottleneck, kernel_t,
            activation, scale, backend, residual).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_frames: int, dropout: float = 0.5,
                 adapters: bool = True, **adapter_args):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("num_frames", num_frames)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        recipe = find_backbone(backbone)
        self.backbone = backbone
        self._recipe = recipe
        if adapters:
            if adapter_config(backbone) is None:
                add_st_adapters(backbone, num_frames=num_frames, **adapter_args)
            elif adapter_args:
                raise ValueError("the backbone already has adapters; adapter options cannot change them")
        else:
            if adapter_args:
                raise TypeError(f"adapter options {sorted(adapter_args)} given with adapters=False")
            backbone.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        reference = next(backbone.parameters())
        self.head = nn.Linear(recipe.width, num_classes, device=reference.device, dtype=reference.dtype)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.num_frames = num_frames

    @property
    def num_frames(self) -> int:
        return self._num_frames

    @num_frames.setter
    def num_frames(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"num_frames must be a positive int, got {value!r}")
        self._num_frames = value
        if adapter_config(self.backbone) is not None:
            set_num_frames(self.backbone, value)

    @property
    def recipe(self) -> Backbone:
        return self._recipe

    def _check(self, clips) -> tuple[int, int]:
        if not isinstance(clips, torch.Tensor):
            raise TypeError(f"clips must be a torch.Tensor (B, 3, T, H, W), got {type(clips).__name__}")
        if clips.dim() != 5:
            raise ValueError(f"clips must be 5-D (B, 3, T, H, W), got shape {tuple(clips.shape)}")
        batch, channels, frames, height, width = clips.shape
        size = self._recipe.image_size
        if channels != 3:
            raise ValueError(f"clips must have 3 colour channels in dim 1 (B, 3, T, H, W), got shape "
                             f"{tuple(clips.shape)}")
        if frames != self._num_frames:
            raise ValueError(f"clips have T={frames} frames (dim 2) but the model was set up for "
                             f"num_frames={self._num_frames}")
        if (height, width) != (size, size):
            raise ValueError(f"clips are {height}x{width} but the backbone takes {size}x{size} "
                             f"({self._recipe.grid}x{self._recipe.grid} patches of {self._recipe.patch_size})")
        return batch, frames

    def _tokens(self, clips: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """(B*T, L, C) tokens after the last block, before the final norm."""
        batch, frames = self._check(clips)
        images = clips.transpose(1, 2).flatten(0, 1)  # (B*T, 3, H, W), frame-major within each clip
        dtype = next(self.head.parameters()).dtype
        tokens = self._recipe.run_blocks(self._recipe.embed(images.to(dtype)))
        return tokens, batch, frames

    def features(self, clips: torch.Tensor) -> torch.Tensor:
        """Per-frame tokens (B, T, L, C) after the backbone's final norm."""
        tokens, batch, frames = self._tokens(clips)
        return self._recipe.final_norm(tokens).unflatten(0, (batch, frames))

    def pooled(self, clips: torch.Tensor) -> torch.Tensor:
        """(B, C): the final norm of the class token averaged over frames (the head's input)."""
        tokens, batch, frames = self._tokens(clips)
        return self._recipe.final_norm(tokens[:, 0].unflatten(0, (batch, frames)).mean(1))

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.pooled(clips)))

    # ---- the official ST-Adapter release ------------------------------------------------------

    @classmethod
    def from_official(cls, checkpoint, clip_weights, num_frames: int = 8, dropout: float = 0.5,
                      **adapter_options) -> "VideoViT":
        """A VideoViT from the official release's checkpoint and OpenAI CLIP's weights.

        Args:
            checkpoint: path to (or the dict of) a `torch.save`d official checkpoint: a dict whose
                "model" entry holds the trainable tensors
                (`transformer.resblocks.N.adapter_pre_attn|pre_mlp.{fc1,conv,fc2}.*`, `fc.*`),
                or that state dict itself.
            clip_weights: path to (or the dict of) OpenAI CLIP's state dict (`visual.*` keys, or
                without the prefix), or its TorchScript archive.
            num_frames: T. Positions, blocks, width, kt, classes and backbone size come from the tensors.
            **adapter_options: runtime options of the adapters (backend).
        """
        name = checkpoint if isinstance(checkpoint, (str, os.PathLike)) else "checkpoint"
        state = read_untrusted_weights(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else \
            _unwrap(checkpoint)
        clip_state = read_untrusted_weights(clip_weights) if isinstance(clip_weights, (str, os.PathLike)) else \
            dict(clip_weights)
        config, adapters, head = split_official_checkpoint(state, name)
        backbone = build_timm_clip_vit(clip_state)
        adapter_width = adapters[config.layers[0], config.positions[0], "fc1.weight"].shape[1]
        if adapter_width != backbone.embed_dim:
            raise AdapterFileError(f"{name}: adapters are for width {adapter_width}, the CLIP weights have width "
                                   f"{backbone.embed_dim}")
        depth = len(backbone.blocks)
        if max(config.layers) >= depth:
            raise AdapterFileError(f"{name}: adapters reach block {max(config.layers)}, the CLIP ViT has "
                                   f"{depth} blocks")
        model = cls(backbone, num_classes=head["weight"].shape[0], num_frames=num_frames, dropout=dropout,
                    positions=config.positions, layers=list(config.layers), bottleneck=config.bottleneck,
                    kernel_t=config.kernel_t, activation=config.activation, **adapter_options)
        model.load_official_state_dict(state, name)
        return model

    def _official_targets(self) -> dict[str, torch.Tensor]:
        targets = {f"fc.{n}": p for n, p in self.head.named_parameters()}
        config = adapter_config(self.backbone)
        for index, block in adapted_blocks(self.backbone):
            for position in config.positions:
                for n, p in getattr(block, CHILD_NAMES[position]).named_parameters():
                    targets[official_adapter_key(index, position, n)] = p
        return targets

    def official_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under the official release's names (what its checkpoints' "model" holds)."""
        return {k: v.detach().clone() for k, v in self._official_targets().items()}

    def load_official_state_dict(self, state: dict[str, torch.Tensor], name: str = "state dict") -> None:
        """Load official-format adapter and head tensors; checks every key and shape before copying."""
        targets = self._official_targets()
        check_fits(name, state, targets)
        with torch.no_grad():
            for key, target in targets.items():
                target.copy_(state[key])


def _unwrap(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, dict) and isinstance(checkpoint.get("model"), dict):
        return dict(checkpoint["model"])
    if isinstance(checkpoint, dict):
        return dict(checkpoint)
    raise TypeError(f"checkpoint must be a path or a dict, got {type(checkpoint).__name__}")


__all__ = ["VideoViT"]
