"""The `stadapter::st_adapter` operator: torch.library registration, autograd, and the public function.

Both the forward and the backward are `torch.library.triton_op`s: custom operators whose fake
implementation is the body itself, and which torch.compile decomposes into that body, so the
Triton kernels (launched through `wrap_triton`), the C++ op or the eager reference are visible
to the compiler and `fullgraph=True` holds. The backend is resolved in Python before the op is
called and passed to it as a string, so one operator serves every backend.

Only x and the parameters are saved for the backward; the bottleneck is recomputed there.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import dispatch
from .spec import AdapterOptions, AdapterTensors, as_btlc, validate


@torch.library.triton_op("stadapter::st_adapter", mutates_args=())
def _st_adapter_op(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    cond: Optional[Tensor],
    num_frames: int,
    prefix: int,
    activation: str,
    scale: float,
    residual: bool,
    layout: str,
    backend: str,
) -> Tensor:
    out = torch.empty_like(x)
    dispatch.backend_module(backend).forward(
        as_btlc(out, layout, num_frames),
        as_btlc(x, layout, num_frames),
        AdapterTensors(fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond),
        AdapterOptions(prefix, activation, scale, residual),
    )
    return out


@torch.library.triton_op("stadapter::st_adapter_backward", mutates_args=())
def _st_adapter_backward_op(
    grad_out: Tensor,
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    cond: Optional[Tensor],
    num_frames: int,
    prefix: int,
    activation: str,
    scale: float,
    residual: bool,
    layout: str,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx = torch.empty_like(x)
    grads = dispatch.backend_module(backend).backward(
        as_btlc(dx, layout, num_frames),
        as_btlc(grad_out, layout, num_frames),
        as_btlc(x, layout, num_frames),
        AdapterTensors(fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond),
        AdapterOptions(prefix, activation, scale, residual),
    )
    return (dx, *grads)


_NUM_TENSOR_INPUTS = 8  # x and the seven AdapterTensors fields


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:_NUM_TENSOR_INPUTS])
    ctx.options = inputs[_NUM_TENSOR_INPUTS:]


def _backward(ctx, grad_out):
    saved = ctx.saved_tensors
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grads = torch.ops.stadapter.st_adapter_backward(grad_out, *saved, *ctx.options)
    # Gradients of absent optional inputs (biases, cond) are computed by the kernels for free
    # and dropped here.
    tensor_grads = tuple(None if t is None else g for t, g in zip(saved, grads))
    return (*tensor_grads, *(None,) * len(ctx.options))


_st_adapter_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast(tensors):
    """Under torch.autocast, run the op in the autocast dtype, as nn.Linear would."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype == torch.float32 else t
            for t in tensors]


def _prepare(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, num_frames, prefix,
             activation, cond, scale, residual, layout, backend):
    """Autocast, validate and resolve: shared by `st_adapter` and `explain`."""
    tensors = [x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond]
    if isinstance(x, torch.Tensor):
        tensors = _autocast(tensors)
    spec = validate(*tensors[:7], num_frames=num_frames, prefix=prefix, activation=activation,
                    cond=tensors[7], scale=scale, residual=residual, layout=layout, backend=backend)
    return tensors, spec, dispatch.resolve(spec, backend)


def st_adapter(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, *, num_frames=None,
               prefix=1, activation="identity", cond=None, scale=1.0, residual=True, layout="nlc",
               backend="auto") -> Tensor:
    """Apply one ST-Adapter to the tokens `x`, out of place; see DESIGN.md for the math.

    Args:
        x: tokens in `layout`: "nlc" (B*T, L, C), "lnc" (L, B*T, C) or "btlc" (B, T, L, C).
        fc1_weight, fc1_bias: down-projection, (Ca, C) and (Ca,) or None.
        conv_weight, conv_bias: depthwise temporal conv, (Ca, 1, kt, 1, 1) and (Ca,) or None;
            kt odd. A spatial kernel (Ca, 1, kt, kh, kw) is served by the reference only.
        fc2_weight, fc2_bias: up-projection, (C, Ca) and (C,) or None.
        num_frames: T; required for "nlc" and "lnc".
        prefix: leading tokens per frame (class/register tokens) passed through unchanged.
        activation: one of `stadapter_kernels.ACTIVATIONS`.
        cond: optional (B, Ca) per-video shift of the bottleneck.
        scale: multiplies the adapter branch before the residual add.
        residual: True (default) returns x + branch; False returns the branch alone (zero on
            the prefix tokens), for adapters whose caller adds them to another stream.
        backend: "auto", "triton", "cpp" or "reference"; see `explain`.

    Returns:
        A new tensor shaped like x; gradients flow to x, every weight and bias, and cond.
    """
    tensors, spec, choice = _prepare(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                                     num_frames, prefix, activation, cond, scale, residual, layout, backend)
    x = tensors[0] if spec.channel_stride_ok else tensors[0].contiguous()
    return torch.ops.stadapter.st_adapter(x, *tensors[1:], spec.frames, prefix, activation, float(scale), residual,
                                          layout, choice.backend)


def explain(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, *, num_frames=None,
            prefix=1, activation="identity", cond=None, scale=1.0, residual=True, layout="nlc",
            backend="auto") -> dispatch.Explanation:
    """Say which backend `st_adapter` would run with these arguments, why, and what it would copy."""
    return _prepare(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, num_frames, prefix,
                    activation, cond, scale, residual, layout, backend)[2]
