"""What stadapter knows about each ViT family it injects into: one small recipe per family.

A recipe says where a model's blocks are, which token layout they run in ("nlc" batch-first
or "lnc" sequence-first, so adapters take the tensor as it is, with no copy), how many prefix
tokens (class, registers) each frame carries, how to embed images into the tokens the first
block sees, and how to call one block's parts (norms, frozen attention, MLP, layer scales).
`find_backbone(model)` binds the matching recipe to a model; injection, the video models and
the few-shot models all go through it, so supporting a new family means adding a recipe here.

Families are recognised by structure, not by import, so none of their libraries is imported
by `import stadapter`, and the OpenAI layout is served whichever copy of CLIP's `model.py`
built it (the PyPI packages, or the official ST-Adapter repository's own copy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

SUPPORTED = ("timm VisionTransformer (timm.models.vision_transformer)",
             "open_clip VisionTransformer (open_clip.transformer)",
             "OpenAI CLIP VisionTransformer (clip.model)")


@dataclass(frozen=True)
class BlockParts:
    """One block's pieces in the order the pre-norm ViT block uses them.

    `attention(x)` runs the block's frozen self-attention on batch-first tokens (N, S, C) for
    any S, whatever layout the block itself runs in.
    """

    norm1: nn.Module
    attention: Callable[[torch.Tensor], torch.Tensor]
    norm2: nn.Module
    mlp: nn.Module
    ls1: nn.Module
    ls2: nn.Module


@dataclass(frozen=True)
class Backbone:
    """A family's recipe bound to one model (the vision tower): see the module docstring.

    Holds only the family name, the model and numbers read off it, so deep copies of a module
    that keeps one stay bound to their own copy of the model.
    """

    family: str  # "timm" | "open_clip" | "openai"
    model: nn.Module
    layout: str  # the layout blocks run in: "nlc" (N, L, C) or "lnc" (L, N, C)
    prefix: int  # class + register tokens per frame
    width: int  # C
    patch_size: int
    image_size: int

    @property
    def blocks(self) -> tuple:
        return tuple(self.model.blocks if self.family == "timm" else self.model.transformer.resblocks)

    @property
    def final_norm(self) -> nn.Module:
        return self.model.norm if self.family == "timm" else self.model.ln_post

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images -> (N, L, C) batch-first tokens before the first block."""
        return _timm_embed(self.model, images) if self.family == "timm" else _clip_embed(self.model, images)

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Batch-first tokens (N, L, C) through every block, batch-first out (before the final norm)."""
        if self.family == "timm":
            return self.model.blocks(tokens)
        if self.family == "open_clip":  # its Transformer converts to and from its own layout
            return self.model.transformer(tokens)
        return self.model.transformer(tokens.transpose(0, 1)).transpose(0, 1)

    @property
    def projection(self) -> Optional[torch.Tensor]:
        """The visual projection (C, D') into CLIP's joint space, or None. timm keeps CLIP's
        projection as its `head` (a bias-free use of a Linear), so there it is `head.weight.T`."""
        if self.family == "timm":
            head = getattr(self.model, "head", None)
            return head.weight.T if isinstance(head, nn.Linear) else None
        return getattr(self.model, "proj", None)

    def parts(self, block: nn.Module) -> BlockParts:
        if self.family == "timm":
            return BlockParts(block.norm1, block.attn, block.norm2, block.mlp, block.ls1, block.ls2)
        if self.family == "open_clip":
            return BlockParts(block.ln_1, _batch_first_attention(block.attn, block.attn.batch_first), block.ln_2,
                              block.mlp, block.ls_1, block.ls_2)
        identity = nn.Identity()
        return BlockParts(block.ln_1, _batch_first_attention(block.attn, False, getattr(block, "attn_mask", None)),
                          block.ln_2, block.mlp, identity, identity)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens(self) -> int:
        """L: prefix tokens plus one per patch."""
        return self.prefix + self.grid ** 2


def _square(size, what: str) -> int:
    if isinstance(size, int):
        return size
    size = tuple(size)
    if len(set(size)) != 1:
        raise TypeError(f"stadapter supports square {what}, got {size}")
    return int(size[0])


def _batch_first_attention(attn: nn.MultiheadAttention, batch_first: bool, mask=None):
    def attention(x: torch.Tensor) -> torch.Tensor:
        q = x if batch_first else x.transpose(0, 1)
        out = attn(q, q, q, need_weights=False, attn_mask=mask)[0]
        return out if batch_first else out.transpose(0, 1)
    return attention


# ---- timm ------------------------------------------------------------------------------------

def _is_timm(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("patch_embed", "blocks", "num_prefix_tokens", "_pos_embed", "norm"))


def _timm_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x)


def _timm(model: nn.Module) -> Backbone:
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("timm VisionTransformer with attn_pool is not supported (class-token models only)")
    if getattr(model, "dynamic_img_size", False):
        raise TypeError("timm VisionTransformer with dynamic_img_size=True is not supported: adapters need a "
                        "fixed patch grid")
    if not getattr(model, "has_class_token", True):
        raise TypeError("timm VisionTransformer without a class token is not supported: the video head pools it")
    for block in model.blocks:
        missing = [n for n in ("norm1", "attn", "norm2", "mlp", "ls1", "ls2", "drop_path1", "drop_path2")
                   if not hasattr(block, n)]
        if missing:
            raise TypeError(f"timm block {type(block).__name__} lacks {missing}: only pre-norm timm Blocks "
                            f"(timm.models.vision_transformer.Block) are supported")
    return Backbone(family="timm", model=model, layout="nlc", prefix=model.num_prefix_tokens, width=model.embed_dim,
                    patch_size=_square(model.patch_embed.patch_size, "patches"),
                    image_size=_square(model.patch_embed.img_size, "images"))


# ---- open_clip and OpenAI CLIP (same module names, different block internals) -----------------

def _is_clip_visual(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in
               ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post"))


def _clip_embed(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    x = model.conv1(images).flatten(2).transpose(1, 2)  # (N, grid*grid, C)
    cls = model.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls, x], dim=1) + model.positional_embedding.to(x.dtype)
    patch_dropout = getattr(model, "patch_dropout", None)
    if patch_dropout is not None:
        x = patch_dropout(x)
    return model.ln_pre(x)


def _clip_common(model: nn.Module, family: str, batch_first: bool) -> Backbone:
    width, _, patch, _ = model.conv1.weight.shape
    grid_tokens = model.positional_embedding.shape[0] - 1
    grid = int(round(grid_tokens ** 0.5))
    if grid * grid != grid_tokens:
        raise TypeError(f"{family} VisionTransformer with a non-square patch grid ({grid_tokens} tokens)")
    return Backbone(family=family, model=model, layout="nlc" if batch_first else "lnc", prefix=1, width=width,
                    patch_size=patch, image_size=grid * patch)


def _open_clip(model: nn.Module) -> Backbone:
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError("open_clip VisionTransformer with attentional pooling is not supported (class-token models only)")
    blocks = list(model.transformer.resblocks)
    kinds = {getattr(type(b), "_stadapter_original_class", type(b)).__name__ for b in blocks}
    if kinds != {"ResidualAttentionBlock"} or any(hasattr(b, "ln_1_kv") for b in blocks):
        raise TypeError(f"open_clip blocks {sorted(kinds)} are not supported: only ResidualAttentionBlock "
                        "(self-attention, nn.MultiheadAttention)")
    return _clip_common(model, "open_clip", model.transformer.batch_first)


def _openai(model: nn.Module) -> Backbone:
    for block in model.transformer.resblocks:
        if not all(hasattr(block, n) for n in ("ln_1", "attn", "ln_2", "mlp")):
            raise TypeError(f"OpenAI CLIP block {type(block).__name__} lacks ln_1/attn/ln_2/mlp")
    return _clip_common(model, "openai", False)


def find_backbone(model: nn.Module) -> Backbone:
    """The recipe for `model`'s family, bound to it; TypeError naming what was found otherwise.

    A whole CLIP model (with `.visual`) is accepted and its vision tower used.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a vision transformer nn.Module, got {type(model).__name__}")
    if _is_timm(model):
        return _timm(model)
    visual = model.visual if isinstance(getattr(model, "visual", None), nn.Module) else model
    if _is_clip_visual(visual):
        # open_clip's Transformer carries `batch_first`; OpenAI's runs sequence-first and has no such flag.
        if hasattr(visual.transformer, "batch_first"):
            return _open_clip(visual)
        return _openai(visual)
    raise TypeError(f"unsupported backbone {type(model).__module__}.{type(model).__name__}: supported are "
                    + "; ".join(SUPPORTED))
