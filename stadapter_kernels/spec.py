"""Validation of `st_adapter` arguments and the canonical (B, T, L, C) view of every layout.

This is the single place where shapes, dtypes and option values are checked. Every backend
receives tensors that passed `validate` and works on the strided `(B, T, L, C)` views that
`as_btlc` returns, so no backend repeats a shape check and no layout needs a copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .activations import ACTIVATIONS

#: Token layouts the op understands (see DESIGN.md).
LAYOUTS = ("nlc", "lnc", "btlc")
#: Backend names a caller may ask for; "auto" picks the fastest eligible one.
BACKEND_CHOICES = ("auto", "triton", "cpp", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AdapterSpec:
    """Sizes and options of one validated call; what dispatch and `explain` reason about."""

    batch: int  # B, videos
    frames: int  # T
    tokens: int  # L, tokens per frame (prefix included)
    prefix: int
    channels: int  # C
    bottleneck: int  # Ca
    kernel_t: int
    kernel_hw: tuple[int, int]  # spatial kernel of the conv; (1, 1) for the temporal adapter
    activation: str
    layout: str
    dtype: torch.dtype
    device: torch.device
    has_cond: bool
    channel_stride_ok: bool  # channel dimension of x has stride 1
    residual: bool = True  # out = x + branch (True) or the branch alone (False)

    @property
    def patches(self) -> int:
        return self.tokens - self.prefix

    @property
    def spatial(self) -> bool:
        return self.kernel_hw != (1, 1)


def _tensor_type_name(value) -> str:
    return type(value).__name__ if not isinstance(value, torch.Tensor) else "Tensor"


def _check_tensor(name: str, value, shape: tuple[int, ...], shape_text: str, like: torch.Tensor):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_text}, got {_tensor_type_name(value)}")
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape_text} = {shape}, got {tuple(value.shape)}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but x is on {like.device}; move them to one device")
    if value.dtype != like.dtype:
        raise TypeError(
            f"{name} has dtype {value.dtype} but x has dtype {like.dtype}; cast them to one dtype "
            "(or run under torch.autocast)"
        )


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {_tensor_type_name(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def validate(
    x,
    fc1_weight,
    fc1_bias,
    conv_weight,
    conv_bias,
    fc2_weight,
    fc2_bias,
    *,
    num_frames,
    prefix,
    activation,
    cond,
    scale,
    layout,
    residual=True,
    backend="auto",
) -> AdapterSpec:
    """Check every argument of `st_adapter`; raise TypeError/ValueError naming the culprit."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(backend, str) or backend not in BACKEND_CHOICES:
        raise ValueError(f"backend must be one of {BACKEND_CHOICES}, got {backend!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite Python float, got {scale!r}")
    if not isinstance(residual, bool):
        raise TypeError(f"residual must be a bool, got {residual!r}")

    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {_tensor_type_name(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must have a floating dtype {FLOAT_DTYPES}, got {x.dtype}")
    expected_rank, shape_text = (4, "(B, T, L, C)") if layout == "btlc" else (
        3, "(B*T, L, C)" if layout == "nlc" else "(L, B*T, C)")
    if x.dim() != expected_rank:
        raise ValueError(f"x must be {expected_rank}-D {shape_text} for layout {layout!r}, got shape {tuple(x.shape)}")

    if layout == "btlc":
        batch, frames, tokens, channels = x.shape
        if num_frames is not None and _check_int("num_frames", num_frames, 1) != frames:
            raise ValueError(f"num_frames={num_frames} disagrees with x.shape[1]={frames} for layout 'btlc'")
    else:
        if num_frames is None:
            raise ValueError(f"num_frames is required for layout {layout!r}: x folds frames into its batch dimension")
        frames = _check_int("num_frames", num_frames, 1)
        tokens, folded = (x.shape[0], x.shape[1]) if layout == "lnc" else (x.shape[1], x.shape[0])
        channels = x.shape[2]
        if folded % frames:
            raise ValueError(
                f"the batch dimension of x ({folded} = B*T) is not divisible by num_frames={frames}")
        batch = folded // frames
    if batch == 0 or tokens == 0 or channels == 0:
        raise ValueError(f"x must not be empty, got shape {tuple(x.shape)}")

    _check_int("prefix", prefix, 0)
    if prefix >= tokens:
        raise ValueError(f"prefix must be smaller than the number of tokens L={tokens}, got {prefix}")

    if not isinstance(fc1_weight, torch.Tensor) or fc1_weight.dim() != 2:
        raise ValueError(f"fc1_weight must be a 2-D tensor (Ca, C), got "
                         f"{tuple(fc1_weight.shape) if isinstance(fc1_weight, torch.Tensor) else _tensor_type_name(fc1_weight)}")
    bottleneck = fc1_weight.shape[0]
    _check_tensor("fc1_weight", fc1_weight, (bottleneck, channels), "(Ca, C)", x)
    if not isinstance(conv_weight, torch.Tensor) or conv_weight.dim() != 5 or conv_weight.shape[1] != 1:
        got = tuple(conv_weight.shape) if isinstance(conv_weight, torch.Tensor) else _tensor_type_name(conv_weight)
        raise ValueError(f"conv_weight must be a depthwise temporal kernel of shape (Ca, 1, kt, 1, 1), got {got}")
    kernel_t, kernel_h, kernel_w = conv_weight.shape[2:]
    _check_tensor("conv_weight", conv_weight, (bottleneck, 1, kernel_t, kernel_h, kernel_w), "(Ca, 1, kt, kh, kw)", x)
    for name, size in (("kt", kernel_t), ("kh", kernel_h), ("kw", kernel_w)):
        if size < 1 or size % 2 == 0:
            raise ValueError(f"conv_weight kernel size {name} must be odd and positive, got {size} "
                             f"(conv_weight shape {tuple(conv_weight.shape)})")
    _check_tensor("fc2_weight", fc2_weight, (channels, bottleneck), "(C, Ca)", x)
    for name, bias, size, text in (("fc1_bias", fc1_bias, bottleneck, "(Ca,)"),
                                   ("conv_bias", conv_bias, bottleneck, "(Ca,)"),
                                   ("fc2_bias", fc2_bias, channels, "(C,)")):
        if bias is not None:
            _check_tensor(name, bias, (size,), text, x)
    if cond is not None:
        _check_tensor("cond", cond, (batch, bottleneck), "(B, Ca)", x)

    patches = tokens - prefix
    if (kernel_h, kernel_w) != (1, 1) and math.isqrt(patches) ** 2 != patches:
        raise ValueError(f"a spatial conv_weight kernel ({kernel_h}, {kernel_w}) needs a square grid of "
                         f"patch tokens, got L - prefix = {patches}")

    return AdapterSpec(
        batch=batch, frames=frames, tokens=tokens, prefix=prefix, channels=channels,
        bottleneck=bottleneck, kernel_t=kernel_t, kernel_hw=(kernel_h, kernel_w),
        activation=activation, layout=layout, dtype=x.dtype, device=x.device,
        has_cond=cond is not None, channel_stride_ok=x.stride(-1) == 1, residual=residual,
    )


def as_btlc(t: torch.Tensor, layout: str, num_frames: int) -> torch.Tensor:
    """Return the (B, T, L, C) view of a tensor in `layout`; never copies."""
    if layout == "btlc":
        return t
    if layout == "nlc":
        return t.unflatten(0, (-1, num_frames))
    return t.unflatten(1, (-1, num_frames)).permute(1, 2, 0, 3)


class AdapterTensors(NamedTuple):
    """The op's parameter tensors, in the op's argument order; also the shape of its gradients."""

    fc1_weight: torch.Tensor  # (Ca, C)
    fc1_bias: Optional[torch.Tensor]  # (Ca,)
    conv_weight: torch.Tensor  # (Ca, 1, kt, kh, kw)
    conv_bias: Optional[torch.Tensor]  # (Ca,)
    fc2_weight: torch.Tensor  # (C, Ca)
    fc2_bias: Optional[torch.Tensor]  # (C,)
    cond: Optional[torch.Tensor]  # (B, Ca)


@dataclass(frozen=True)
class AdapterOptions:
    """The op's non-tensor options that every backend needs.

    `residual=False` drops the identity term: the output is `scale * (a @ w_up.T + b_up)` on
    the patch tokens and zero on the prefix tokens (an adapter whose caller adds it elsewhere,
    as AIM/MA-CLIP's parallel and skip-less adapters do).
    """

    prefix: int
    activation: str
    scale: float
    residual: bool = True
