"""Put ST-Adapters into the user's own ViT, in place, and take them out again.

`add_st_adapters` adds each adapter as a new child of its block (`blocks.3.st_adapter_pre_mlp`)
and switches the block to a subclass of its own class whose forward calls the adapters at the
official places; every backbone key keeps its name, so backbone checkpoints still load one to
one. `remove_st_adapters` switches the classes back and drops the children.

The number of frames is an attribute of each adapted block (`stadapter_num_frames`), set by the
video model (or `set_num_frames`) before the backbone runs and left set: no global state, so two
models with different T do not interfere, an activation-checkpoint recompute sees the same T,
and torch.compile reads it as a constant.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn

from .backbones import Backbone, find_backbone
from .modules import STAdapter

POSITIONS = ("pre_attn", "pre_mlp")
#: Adapter child names, by position: the only keys injection adds to a block.
CHILD_NAMES = {position: f"st_adapter_{position}" for position in POSITIONS}
#: STAdapter arguments a config may carry besides the ones `add_st_adapters` names.
_ADAPTER_OPTIONS = ("scale", "backend", "residual")


@dataclass(frozen=True)
class AdapterConfig:
    """Where the adapters are and what they are: what an adapter file stores beside the tensors."""

    positions: tuple[str, ...]
    layers: tuple[int, ...]  # block indices
    bottleneck: int
    kernel_t: int
    activation: str
    scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown adapter config keys {unknown}; expected {sorted(known)}")
        values = dict(data)
        values["positions"] = tuple(values["positions"])
        values["layers"] = tuple(int(i) for i in values["layers"])
        return cls(**values)


@dataclass
class AdapterSummary:
    """What injection did: printed as a table of blocks, positions and parameter counts."""

    family: str
    config: AdapterConfig
    adapter_params: int
    trainable_params: int
    total_params: int
    per_block: dict[int, int] = field(default_factory=dict)  # block index -> adapter params

    def __str__(self) -> str:
        rows = [f"ST-Adapters in a {self.family} ViT: {len(self.config.layers)} blocks x "
                f"{'+'.join(self.config.positions)}, bottleneck {self.config.bottleneck}, kt {self.config.kernel_t}, "
                f"activation {self.config.activation}",
                f"{'block':>6}  {'positions':<18} {'adapter params':>15}"]
        rows += [f"{index:>6}  {','.join(self.config.positions):<18} {count:>15,}"
                 for index, count in self.per_block.items()]
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        rows.append(f"adapter params: {self.adapter_params:,} | trainable: {self.trainable_params:,} | "
                    f"total: {self.total_params:,} ({share:.2f}% trainable)")
        return "\n".join(rows)


# ---- adapted block forwards: the official order, pre_attn on the block input, pre_mlp between ----

def _frames(block: nn.Module) -> int:
    frames = block.stadapter_num_frames
    if frames is None:
        raise RuntimeError("the number of frames is not set on this adapted model: build it with "
                           "stadapter.models.VideoViT, or call stadapter.set_num_frames(model, T) first")
    return frames


def _adapt(block: nn.Module, x: torch.Tensor, position: str) -> torch.Tensor:
    if position not in block.stadapter_positions:
        return x
    return getattr(block, CHILD_NAMES[position])(x, _frames(block))


def _timm_forward(self, x, attn_mask=None, is_causal=False):
    x = _adapt(self, x, "pre_attn")
    h = self.norm1(x)
    # Only newer timm Attention takes masks; pass them only when given.
    h = self.attn(h) if attn_mask is None and not is_causal else self.attn(h, attn_mask=attn_mask, is_causal=is_causal)
    x = x + self.drop_path1(self.ls1(h))
    x = _adapt(self, x, "pre_mlp")
    return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _open_clip_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
    if k_x is not None or v_x is not None:
        raise NotImplementedError("ST-Adapters adapt self-attention blocks; this block was called with k_x/v_x")
    x = _adapt(self, q_x, "pre_attn")
    x = x + self.ls_1(self.attention(q_x=self.ln_1(x), attn_mask=attn_mask))
    x = _adapt(self, x, "pre_mlp")
    return x + self.ls_2(self.mlp(self.ln_2(x)))


def _openai_forward(self, x):
    x = _adapt(self, x, "pre_attn")
    x = x + self.attention(self.ln_1(x))
    x = _adapt(self, x, "pre_mlp")
    return x + self.mlp(self.ln_2(x))


_FORWARDS = {"timm": _timm_forward, "open_clip": _open_clip_forward, "openai": _openai_forward}
_ADAPTED_CLASSES: dict[tuple[type, str], type] = {}


def _adapted_class(cls: type, family: str) -> type:
    """A subclass of the block's own class with the adapter-calling forward (one per class)."""
    key = (cls, family)
    if key not in _ADAPTED_CLASSES:
        _ADAPTED_CLASSES[key] = type(f"STAdapted{cls.__name__}", (cls,), {
            "forward": _FORWARDS[family], "_stadapter_original_class": cls, "__module__": __name__})
    return _ADAPTED_CLASSES[key]


def is_adapted(block: nn.Module) -> bool:
    return hasattr(type(block), "_stadapter_original_class")


def _resolve_layers(layers, depth: int) -> tuple[int, ...]:
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all', an int N (the last N blocks) or a list of block indices, "
                             f"got {layers!r}")
        return tuple(range(depth))
    if isinstance(layers, bool):
        raise TypeError(f"layers must be 'all', an int or a list of block indices, got {layers!r}")
    if isinstance(layers, int):
        if not 1 <= layers <= depth:
            raise ValueError(f"layers={layers}: the model has {depth} blocks, so N must be in 1..{depth}")
        return tuple(range(depth - layers, depth))
    indices = list(layers)
    if not indices or any(isinstance(i, bool) or not isinstance(i, int) for i in indices):
        raise TypeError(f"layers must be a non-empty list of int block indices, got {layers!r}")
    normalised = [i + depth if i < 0 else i for i in indices]
    bad = [i for i, n in zip(indices, normalised) if not 0 <= n < depth]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {depth} blocks")
    if len(set(normalised)) != len(normalised):
        raise ValueError(f"layers lists a block twice: {indices}")
    return tuple(sorted(normalised))


def _resolve_positions(positions) -> tuple[str, ...]:
    positions = (positions,) if isinstance(positions, str) else tuple(positions)
    unknown = [p for p in positions if p not in POSITIONS]
    if unknown or not positions or len(set(positions)) != len(positions):
        raise ValueError(f"positions must be a non-empty selection of {POSITIONS} without repeats, got {positions}")
    return tuple(p for p in POSITIONS if p in positions)  # canonical order


def _root_state(model: nn.Module) -> dict:
    return model.__dict__.setdefault("_stadapter_state", {})


def add_st_adapters(model: nn.Module, positions: Sequence[str] | str = ("pre_mlp",), layers="all",
                    bottleneck: int = 384, kernel_t: int = 3, activation: str = "identity", freeze: bool = True,
                    num_frames: int | None = None, **adapter_kwargs) -> AdapterSummary:
    """Add ST-Adapters to a timm, open_clip or OpenAI-CLIP ViT in place; returns what was added.

    Args:
        model: the vision transformer (or a whole CLIP model, whose `.visual` is adapted).
        positions: "pre_attn" (on the block input) and/or "pre_mlp" (on the residual stream
            between attention and MLP), as the official ST-Adapter.
        layers: "all", an int N (the last N blocks, the official `adapter_layers`) or block indices.
        bottleneck, kernel_t, activation: the adapter's width Ca, temporal kernel and activation.
        freeze: freeze every parameter of the model except the adapters.
        num_frames: T, if known now (a video model sets it itself).
        **adapter_kwargs: further `STAdapter` options: scale, backend, residual.
    """
    backbone = find_backbone(model)
    if any(is_adapted(block) for block in backbone.blocks):
        raise ValueError("this model already has ST-Adapters; call stadapter.remove_st_adapters(model) first")
    unknown = sorted(set(adapter_kwargs) - set(_ADAPTER_OPTIONS))
    if unknown:
        raise TypeError(f"unknown adapter options {unknown}; add_st_adapters takes {list(_ADAPTER_OPTIONS)} "
                        "besides its named arguments")
    config = AdapterConfig(positions=_resolve_positions(positions), layers=_resolve_layers(layers, len(backbone.blocks)),
                           bottleneck=bottleneck, kernel_t=kernel_t, activation=activation,
                           scale=float(adapter_kwargs.get("scale", 1.0)))
    options = {k: v for k, v in adapter_kwargs.items() if k != "scale"}
    # Build every adapter before touching the model, so a bad option leaves it as it was.
    reference = next(backbone.blocks[0].parameters())
    built = {index: {position: STAdapter(backbone.width, bottleneck, kernel_t, activation,
                                         prefix_tokens=backbone.prefix, layout=backbone.layout,
                                         scale=config.scale, **options).to(reference.device, reference.dtype)
                     for position in config.positions}
             for index in config.layers}

    state = _root_state(model)
    if freeze:
        state["requires_grad"] = {name: p.requires_grad for name, p in model.named_parameters()}
        model.requires_grad_(False)
    for index, adapters in built.items():
        block = backbone.blocks[index]
        for position, adapter in adapters.items():
            block.add_module(CHILD_NAMES[position], adapter)
        block.stadapter_positions = config.positions
        block.stadapter_num_frames = num_frames
        block.__class__ = _adapted_class(type(block), backbone.family)
    state["config"] = config
    return summarize(model)


def _injected_root(model: nn.Module) -> nn.Module:
    """The module `add_st_adapters` was called on: `model` itself or one of its submodules
    (a video model's backbone)."""
    for module in model.modules():
        if module.__dict__.get("_stadapter_state", {}).get("config") is not None:
            return module
    raise ValueError("this model has no ST-Adapters (add_st_adapters adds them)")


def adapted_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(index, block) for every block of `model`'s backbone that carries adapters."""
    return [(i, b) for i, b in enumerate(find_backbone(_injected_root(model)).blocks) if is_adapted(b)]


def adapter_modules(model: nn.Module) -> list[STAdapter]:
    return [m for m in model.modules() if isinstance(m, STAdapter)]


def adapter_config(model: nn.Module) -> AdapterConfig | None:
    """The config `add_st_adapters` recorded on `model` or any of its submodules, or None."""
    for module in model.modules():
        config = module.__dict__.get("_stadapter_state", {}).get("config")
        if config is not None:
            return config
    return None


def summarize(model: nn.Module) -> AdapterSummary:
    config = adapter_config(model)
    if config is None:
        raise ValueError("this model has no ST-Adapters (add_st_adapters adds them)")
    per_block = {i: sum(p.numel() for name in (CHILD_NAMES[pos] for pos in config.positions)
                        for p in getattr(b, name).parameters())
                 for i, b in adapted_blocks(model)}
    return AdapterSummary(
        family=find_backbone(_injected_root(model)).family, config=config, adapter_params=sum(per_block.values()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        total_params=sum(p.numel() for p in model.parameters()), per_block=per_block)


def set_num_frames(model: nn.Module, num_frames: int) -> None:
    """Tell every adapter in `model` how many frames each video has (x folds them into its batch)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
    blocks = [m for m in model.modules() if is_adapted(m)]
    if not blocks:
        raise ValueError("this model has no ST-Adapters (add_st_adapters adds them)")
    for block in blocks:
        block.stadapter_num_frames = num_frames


def remove_st_adapters(model: nn.Module) -> nn.Module:
    """Undo `add_st_adapters`: original block classes, no adapter children, original requires_grad."""
    backbone = find_backbone(model)
    blocks = [b for b in backbone.blocks if is_adapted(b)]
    if not blocks:
        raise ValueError("this model has no ST-Adapters to remove")
    for block in blocks:
        for name in CHILD_NAMES.values():
            if name in block._modules:
                delattr(block, name)
        del block.stadapter_positions, block.stadapter_num_frames
        block.__class__ = type(block)._stadapter_original_class
    state = _root_state(model)
    flags = state.pop("requires_grad", None)
    if flags is not None:
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, p.requires_grad))
    state.pop("config", None)
    return model


__all__ = ["AdapterConfig", "AdapterSummary", "POSITIONS", "add_st_adapters", "adapter_config", "adapter_modules",
           "adapted_blocks", "remove_st_adapters", "set_num_frames", "summarize", "Backbone"]
