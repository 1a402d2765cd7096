"""Triton helpers shared by the forward and backward kernels: activations, tiles of the
bottleneck, the temporal conv over a rolling window, and the prefix-token copy.

The bottleneck tile of one frame is (BLOCK_P, CA_PAD): CA_PAD is Ca rounded up to a power of
two (tl.arange needs one); the padded columns load zero weights, so they stay exactly zero
through the conv and every activation (act(0) = 0 for all of them) and contribute nothing.

Offsets into token tensors (x, out, grad_out, dx, the transient buffers) are int64, so tensors
over 2^31 elements work; offsets into weights are int32 (Ca x C is far below 2^31), which
keeps their pointer arithmetic out of scarce registers.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

#: The op's activation names, in the order of the kernels' ACTIVATION constexpr.
ACTIVATION_IDS = {"identity": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "quick_gelu": 4, "silu": 5}
#: Largest temporal kernel the window code carries (kt = 1, 3, 5).
MAX_KERNEL_T = 5

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@triton.jit
def _tanh(u):
    # tanh from a sigmoid: tl has no tanh that also runs in the interpreter.
    return 2.0 * tl.sigmoid(2.0 * u) - 1.0


@triton.jit
def activation_forward(z, ACTIVATION: tl.constexpr):
    """act(z) for fp32 z; the formulas of stadapter_kernels/activations.py."""
    if ACTIVATION == 1:
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == 2:
        out = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACTIVATION == 3:
        inner = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        out = 0.5 * z * (1.0 + _tanh(inner))
    elif ACTIVATION == 4:
        out = z * tl.sigmoid(1.702 * z)
    elif ACTIVATION == 5:
        out = z * tl.sigmoid(z)
    else:
        out = z
    return out


@triton.jit
def activation_derivative(z, ACTIVATION: tl.constexpr):
    """d act(z) / dz for fp32 z."""
    if ACTIVATION == 1:
        out = tl.where(z > 0.0, 1.0, 0.0)
    elif ACTIVATION == 2:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        out = cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACTIVATION == 3:
        t = _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))
        out = 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACTIVATION == 4:
        s = tl.sigmoid(1.702 * z)
        out = s + 1.702 * z * s * (1.0 - s)
    elif ACTIVATION == 5:
        s = tl.sigmoid(z)
        out = s * (1.0 + z * (1.0 - s))
    else:
        out = tl.full(z.shape, 1.0, tl.float32)
    return out


#: DOT_PRECISION value that upcasts the operands to fp32 first: the interpreter multiplies bf16
#: operands of tl.dot as their raw uint16 bits (triton 3.8), so bf16 runs there need it. The
#: upcast is exact and the product is then computed in fp32, as the GPU's bf16 MMA does.
UPCAST_PRECISION = "upcast_ieee"


@triton.jit
def matmul(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; see UPCAST_PRECISION."""
    if DOT_PRECISION == "upcast_ieee":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def down_projection(x_ptr, row_offsets, row_mask, frame, T, w_down_ptr, b_down_ptr, cond_ptr, batch, C, CA,
                    HAS_B_DOWN: tl.constexpr, HAS_COND: tl.constexpr, CA_PAD: tl.constexpr,
                    BLOCK_C: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """y[frame] = x @ w_down.T + b_down + cond[batch] for one tile, fp32; zero when frame is
    outside [0, T), which is the conv's zero padding (bias and cond included).

    `row_offsets` (BLOCK_P,) are the int64 element offsets of the tile's rows in `frame`.
    """
    ca = tl.arange(0, CA_PAD)
    ca_mask = ca < CA
    frame_ok = (frame >= 0) & (frame < T)
    acc = tl.zeros((row_offsets.shape[0], CA_PAD), dtype=tl.float32)
    if frame_ok:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            x = tl.load(x_ptr + row_offsets[:, None] + c[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_down_ptr + ca[None, :] * C + c[:, None], mask=ca_mask[None, :] & c_mask[:, None],
                        other=0.0)
            acc = matmul(x, w, acc, DOT_PRECISION)
        if HAS_B_DOWN:
            acc += tl.load(b_down_ptr + ca, mask=ca_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_COND:
            acc += tl.load(cond_ptr + batch.to(tl.int64) * CA + ca, mask=ca_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def conv_tap(y, w_conv_ptr, tap, CA, KT: tl.constexpr, CA_PAD: tl.constexpr):
    """w_conv[:, tap] * y, fp32: one tap of the depthwise temporal conv (w_conv is (Ca, KT))."""
    ca = tl.arange(0, CA_PAD)
    w = tl.load(w_conv_ptr + ca * KT + tap, mask=ca < CA, other=0.0).to(tl.float32)
    return w[None, :] * y.to(tl.float32)


@triton.jit
def temporal_conv(y_m2, y_m1, y_0, y_p1, y_p2, w_conv_ptr, b_conv_ptr, CA,
                  KT: tl.constexpr, HAS_B_CONV: tl.constexpr, CA_PAD: tl.constexpr):
    """z[t] from the window y[t-2] .. y[t+2] (only the KT middle ones are read), fp32."""
    if KT == 1:
        z = conv_tap(y_0, w_conv_ptr, 0, CA, KT, CA_PAD)
    elif KT == 3:
        z = (conv_tap(y_m1, w_conv_ptr, 0, CA, KT, CA_PAD) + conv_tap(y_0, w_conv_ptr, 1, CA, KT, CA_PAD)
             + conv_tap(y_p1, w_conv_ptr, 2, CA, KT, CA_PAD))
    else:
        z = (conv_tap(y_m2, w_conv_ptr, 0, CA, KT, CA_PAD) + conv_tap(y_m1, w_conv_ptr, 1, CA, KT, CA_PAD)
             + conv_tap(y_0, w_conv_ptr, 2, CA, KT, CA_PAD) + conv_tap(y_p1, w_conv_ptr, 3, CA, KT, CA_PAD)
             + conv_tap(y_p2, w_conv_ptr, 4, CA, KT, CA_PAD))
    if HAS_B_CONV:
        ca = tl.arange(0, CA_PAD)
        z += tl.load(b_conv_ptr + ca, mask=ca < CA, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def copy_prefix_tile(src_ptr, dst_ptr, prefix_tile, batch, T, C, prefix,
                     src_sb, src_st, src_sl, dst_sb, dst_st, dst_sl,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Copy one tile of prefix tokens (class/register tokens) of every frame of one video."""
    token = prefix_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    token_mask = token < prefix
    b = batch.to(tl.int64)
    src_rows = b * src_sb + token.to(tl.int64) * src_sl
    dst_rows = b * dst_sb + token.to(tl.int64) * dst_sl
    for t in range(T):
        frame = b * 0 + t  # int64, so frame * stride cannot overflow
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = token_mask[:, None] & (c < C)[None, :]
            v = tl.load(src_ptr + (src_rows + frame * src_st)[:, None] + c[None, :], mask=mask)
            tl.store(dst_ptr + (dst_rows + frame * dst_st)[:, None] + c[None, :], v, mask=mask)
