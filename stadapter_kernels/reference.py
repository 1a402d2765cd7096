"""Eager PyTorch implementation of the adapter (the `reference` backend) and the float64 oracle.

`forward`/`backward` are the reference backend: they run on any device and dtype and are what
users get when no fused kernel can serve. They work on the channels-last `(B, T, P, Ca)`
bottleneck directly: the temporal convolution is a handful of shifted multiply-adds, with no
permute to channels-first and no Conv3d. The backward recomputes the bottleneck from x.

`oracle` is an independent, differentiable float64 formulation (Conv3d on a channels-first
copy, the official module's data flow) that the tests hold every backend to.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .activations import ACTIVATIONS
from .spec import AdapterOptions, AdapterTensors, as_btlc


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _temporal_windows(frames: int, kernel_t: int):
    """Yield (tap j, shift d, lo, hi): output frames [lo, hi) read input frames [lo + d, hi + d)."""
    half = kernel_t // 2
    for j in range(kernel_t):
        d = j - half
        lo, hi = max(0, -d), min(frames, frames - d)
        if lo < hi:
            yield j, d, lo, hi


def _as_grid(t: torch.Tensor) -> torch.Tensor:
    """(B, T, P, Ca) -> channels-first (B, Ca, T, H, W) view of a square patch grid, no copy."""
    side = math.isqrt(t.shape[2])
    return t.unflatten(2, (side, side)).permute(0, 4, 1, 2, 3)


def _from_grid(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 4, 1).flatten(2, 3)


def _spatial_padding(weight: torch.Tensor) -> tuple[int, int, int]:
    return tuple(k // 2 for k in weight.shape[2:])


def _conv(y: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Depthwise conv of the (B, T, P, Ca) bottleneck, zero padding; weight (Ca, 1, kt, kh, kw)."""
    if weight.shape[3:] != (1, 1):
        z = F.conv3d(_as_grid(y), weight, bias, padding=_spatial_padding(weight), groups=weight.shape[0])
        return _from_grid(z)
    taps = weight.flatten(1)  # (Ca, kt)
    z = torch.zeros_like(y) if bias is None else bias.expand_as(y).clone()
    for j, d, lo, hi in _temporal_windows(y.shape[1], taps.shape[1]):
        z[:, lo:hi].addcmul_(y[:, lo + d:hi + d], taps[:, j])
    return z


def _conv_backward(dz: torch.Tensor, y: torch.Tensor, weight: torch.Tensor):
    """Gradients of `_conv` with respect to its input, weight and bias."""
    dbias = dz.sum((0, 1, 2))
    if weight.shape[3:] != (1, 1):
        grid_dz, grid_y = _as_grid(dz), _as_grid(y)
        padding, groups = _spatial_padding(weight), weight.shape[0]
        dy = torch.nn.grad.conv3d_input(grid_y.shape, weight, grid_dz, padding=padding, groups=groups)
        dweight = torch.nn.grad.conv3d_weight(grid_y, weight.shape, grid_dz, padding=padding, groups=groups)
        return _from_grid(dy), dweight, dbias
    taps = weight.flatten(1)
    dy = torch.zeros_like(dz)
    dtaps = torch.zeros_like(taps)
    for j, d, lo, hi in _temporal_windows(dz.shape[1], taps.shape[1]):
        dy[:, lo + d:hi + d].addcmul_(dz[:, lo:hi], taps[:, j])
        dtaps[:, j] = (dz[:, lo:hi] * y[:, lo + d:hi + d]).sum((0, 1, 2))
    return dy, dtaps.view_as(weight), dbias


def _bottleneck(x_patches: torch.Tensor, params: AdapterTensors, activation: str):
    """y (down-projection + cond), z (conv) and a (activation) in the accumulation dtype."""
    acc = _accumulation_dtype(x_patches.dtype)
    y = F.linear(x_patches, params.fc1_weight, params.fc1_bias).to(acc)
    if params.cond is not None:
        y = y + params.cond.to(acc)[:, None, None, :]
    conv_bias = None if params.conv_bias is None else params.conv_bias.to(acc)
    z = _conv(y, params.conv_weight.to(acc), conv_bias)
    return y, z, ACTIVATIONS[activation].forward(z)


def forward(out: torch.Tensor, x: torch.Tensor, params: AdapterTensors, options: AdapterOptions) -> None:
    """Write the adapter's output into `out`; `x` and `out` are (B, T, L, C) views."""
    prefix = options.prefix
    x_patches = x[:, :, prefix:]
    _, _, a = _bottleneck(x_patches, params, options.activation)
    up = F.linear(a.to(x.dtype), params.fc2_weight, params.fc2_bias)
    if options.residual:
        out[:, :, :prefix] = x[:, :, :prefix]
        torch.add(x_patches, up, alpha=options.scale, out=out[:, :, prefix:])
    else:
        out[:, :, :prefix] = 0
        torch.mul(up, options.scale, out=out[:, :, prefix:])


def backward(dx: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, params: AdapterTensors,
             options: AdapterOptions) -> AdapterTensors:
    """Write dL/dx into `dx` and return the parameter gradients (all present, even for absent biases).

    `dx`, `grad_out` and `x` are (B, T, L, C) views. The bottleneck is recomputed from x.
    """
    prefix, dtype = options.prefix, x.dtype
    acc = _accumulation_dtype(dtype)
    x_patches, grad_patches = x[:, :, prefix:], grad_out[:, :, prefix:]
    y, z, a = _bottleneck(x_patches, params, options.activation)

    d_up = grad_patches.to(acc) * options.scale  # (B, T, P, C)
    d_up_rows = d_up.flatten(0, 2)
    d_fc2_weight = (d_up_rows.T.to(dtype) @ a.flatten(0, 2).to(dtype))
    d_fc2_bias = d_up_rows.sum(0)
    da = F.linear(d_up.to(dtype), params.fc2_weight.T).to(acc)
    dz = da if options.activation == "identity" else da * ACTIVATIONS[options.activation].derivative(z)
    dy, d_conv_weight, d_conv_bias = _conv_backward(dz, y, params.conv_weight.to(acc))
    dy_low = dy.to(dtype)
    d_fc1_weight = dy_low.flatten(0, 2).T @ x_patches.flatten(0, 2)
    d_fc1_bias = dy.sum((0, 1, 2))
    d_cond = dy.sum((1, 2))

    through_fc1 = F.linear(dy_low, params.fc1_weight.T)
    if options.residual:
        dx[:, :, :prefix] = grad_out[:, :, :prefix]
        dx[:, :, prefix:] = grad_patches + through_fc1
    else:
        dx[:, :, :prefix] = 0
        dx[:, :, prefix:] = through_fc1
    return AdapterTensors(
        d_fc1_weight.to(dtype), d_fc1_bias.to(dtype), d_conv_weight.to(dtype), d_conv_bias.to(dtype),
        d_fc2_weight.to(dtype), d_fc2_bias.to(dtype), d_cond.to(dtype),
    )


def oracle(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, *, num_frames=None,
           prefix=1, activation="identity", cond=None, scale=1.0, residual=True, layout="nlc") -> torch.Tensor:
    """float64 ground truth of `st_adapter` (same arguments), differentiable by autograd.

    Inputs are cast to float64 (a differentiable cast), so gradients reach the caller's tensors.
    It follows the official module's data flow (channels-first Conv3d) and shares no code with
    `forward`/`backward` beyond the activation functions.
    """
    def f64(t):
        return None if t is None else t.to(torch.float64)

    x = f64(x)
    frames = num_frames if layout != "btlc" else x.shape[1]
    x4 = as_btlc(x, layout, frames)
    batch, frames, tokens, _ = x4.shape
    x_patches = x4[:, :, prefix:]
    y = x_patches @ f64(fc1_weight).T
    if fc1_bias is not None:
        y = y + f64(fc1_bias)
    if cond is not None:
        y = y + f64(cond)[:, None, None, :]
    weight = f64(conv_weight)
    kh, kw = weight.shape[3:]
    patches = tokens - prefix
    grid = (patches, 1) if (kh, kw) == (1, 1) else (math.isqrt(patches),) * 2
    y5 = y.reshape(batch, frames, *grid, -1).permute(0, 4, 1, 2, 3).contiguous()
    z5 = F.conv3d(y5, weight, f64(conv_bias), padding=tuple(k // 2 for k in weight.shape[2:]), groups=weight.shape[0])
    z = z5.permute(0, 2, 3, 4, 1).reshape(batch, frames, patches, -1)
    a = ACTIVATIONS[activation].forward(z)
    up = a @ f64(fc2_weight).T
    if fc2_bias is not None:
        up = up + f64(fc2_bias)
    if residual:
        out4 = torch.cat([x4[:, :, :prefix], x_patches + scale * up], dim=2)
    else:
        out4 = torch.cat([torch.zeros_like(x4[:, :, :prefix]), scale * up], dim=2)
    if layout == "nlc":
        return out4.flatten(0, 1)
    if layout == "lnc":
        return out4.permute(2, 0, 1, 3).flatten(1, 2)
    return out4


def unavailable_reason(spec) -> None:
    """The reference serves every validated call, on every device and dtype."""
    return None
