"""The two-GEMM variant: the bottleneck y goes through global memory once, in exchange for
plain, well-shaped GEMM kernels with thousands of independent programs (no scratch ring, no
barriers, no persistent loop), to measure against the fused kernels on each GPU.

Forward:
- `down_gemm_kernel` (K1): y = x_p @ w_down.T + b_down + cond[b], one program per (video,
  frame, patch tile, BLOCK_A columns of Ca), y stored in `configs.ring_dtype`.
- `up_gemm_kernel` (K2): out = x + scale * (act(conv_t(y)) @ w_up.T + b_up), one program per
  (video, frame, tile, BLOCK_C columns of C); its prologue builds each BLOCK_A chunk of a from
  the kt y tiles of the same patch rows in frames t - kt//2 .. t + kt//2, the residual is its
  epilogue. Prefix-token tiles copy their columns of x (write zeros under residual=False,
  which also drops the residual).

Backward: K1 again (y recomputed from x), then
- `dz_gemm_kernel`: da = scale * grad_out @ w_up per (video, frame, patch tile, BLOCK_A
  columns), with the conv recomputed from y in the epilogue: a = act(z) and dz = da * act'(z)
  to the transient buffers, and the conv gradients' partial sums per 16 patch rows;
- then the fused variant's `backward_input` (dy = the transposed conv of dz in the prologue of
  dx = grad_out + dy @ w_down) and split-K weight-gradient GEMMs.

Programs are numbered with the innermost output-column tile first, then the frame, so the
programs that read one y tile (its own frame and the kt - 1 neighbours) run close together
and find it in L2.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (activation_derivative, activation_forward, down_projection, matmul, store_row_group_sums,
                     store_up_projection)


@triton.jit
def down_gemm_kernel(
    x_ptr, y_ptr, w_down_ptr, b_down_ptr, cond_ptr,
    T, P, C, CA, prefix,
    x_sb, x_st, x_sl,
    HAS_B_DOWN: tl.constexpr, HAS_COND: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = (CA + BLOCK_A - 1) // BLOCK_A
    tiles = (P + BLOCK_P - 1) // BLOCK_P
    cols = (pid % col_tiles).to(tl.int32) * BLOCK_A + tl.arange(0, BLOCK_A)
    frame = (pid // col_tiles) % T
    tile = ((pid // (col_tiles * T)) % tiles).to(tl.int32)
    batch = pid // (col_tiles * T * tiles)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    row_mask = p < P
    x_rows = batch * x_sb + (prefix + p).to(tl.int64) * x_sl
    y = down_projection(x_ptr, x_rows + frame * x_st, row_mask, frame, T, w_down_ptr, b_down_ptr, cond_ptr, batch,
                        cols, C, CA, HAS_B_DOWN, HAS_COND, BLOCK_C, DOT_PRECISION)
    y_rows = ((batch * T + frame) * P + p) * CA
    tl.store(y_ptr + y_rows[:, None] + cols[None, :], y.to(y_ptr.dtype.element_ty),
             mask=row_mask[:, None] & (cols < CA)[None, :])


@triton.jit
def conv_from_buffer(y_ptr, batch, frame, T, P, CA, p, row_mask, cols, col_mask, w_conv_ptr, b_conv_ptr,
                     KT: tl.constexpr, HAS_B_CONV: tl.constexpr):
    """z[frame][p, cols] from the (B, T, P, Ca) y buffer: the kt taps, zero outside [0, T)."""
    z = tl.zeros((p.shape[0], cols.shape[0]), tl.float32)
    for tap in range(KT):
        source = frame + tap - KT // 2
        ok = (source >= 0) & (source < T)
        rows = ((batch * T + source) * P + p) * CA
        y = tl.load(y_ptr + rows[:, None] + cols[None, :], mask=(row_mask[:, None] & col_mask[None, :]) & ok,
                    other=0.0)
        w = tl.load(w_conv_ptr + cols * KT + tap, mask=col_mask, other=0.0).to(tl.float32)
        z += w[None, :] * y.to(tl.float32)
    if HAS_B_CONV:
        z += tl.load(b_conv_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def up_gemm_kernel(
    x_ptr, out_ptr, y_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, b_up_ptr,
    T, P, C, CA, prefix,
    x_sb, x_st, x_sl, out_sb, out_st, out_sl,
    scale,
    KT: tl.constexpr, ACTIVATION: tl.constexpr, HAS_B_CONV: tl.constexpr, HAS_B_UP: tl.constexpr,
    RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = (C + BLOCK_C - 1) // BLOCK_C
    prefix_tiles = (prefix + BLOCK_P - 1) // BLOCK_P
    tiles = prefix_tiles + (P + BLOCK_P - 1) // BLOCK_P
    c = (pid % col_tiles).to(tl.int32) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    frame = (pid // col_tiles) % T
    tile = ((pid // (col_tiles * T)) % tiles).to(tl.int32)
    batch = pid // (col_tiles * T * tiles)
    rows = tl.arange(0, BLOCK_P)
    if tile < prefix_tiles:
        prefix_token = (tile * BLOCK_P + rows).to(tl.int64)
        prefix_mask = (prefix_token < prefix)[:, None] & c_mask[None, :]
        if RESIDUAL:
            v = tl.load(x_ptr + (batch * x_sb + frame * x_st + prefix_token * x_sl)[:, None] + c[None, :],
                        mask=prefix_mask)
        else:
            v = tl.zeros((BLOCK_P, BLOCK_C), out_ptr.dtype.element_ty)
        tl.store(out_ptr + (batch * out_sb + frame * out_st + prefix_token * out_sl)[:, None] + c[None, :], v,
                 mask=prefix_mask)
    else:
        p = (tile - prefix_tiles) * BLOCK_P + rows
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        up = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
        for a0 in range(0, CA, BLOCK_A):
            cols = a0 + tl.arange(0, BLOCK_A)
            col_mask = cols < CA
            z = conv_from_buffer(y_ptr, batch, frame, T, P, CA, p, row_mask, cols, col_mask, w_conv_ptr, b_conv_ptr,
                                 KT, HAS_B_CONV)
            a = activation_forward(z, ACTIVATION).to(x_ptr.dtype.element_ty)
            w_up = tl.load(w_up_ptr + c[None, :] * CA + cols[:, None], mask=c_mask[None, :] & col_mask[:, None],
                           other=0.0)
            up = matmul(a, w_up, up, DOT_PRECISION)
        store_up_projection(up, b_up_ptr, c, c_mask, row_mask, scale, x_ptr, batch * x_sb + frame * x_st + token * x_sl,
                            out_ptr, batch * out_sb + frame * out_st + token * out_sl, HAS_B_UP, RESIDUAL)


@triton.jit
def dz_gemm_kernel(
    grad_ptr, y_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, a_buf_ptr, dz_buf_ptr, conv_partial_ptr,
    T, P, C, CA, prefix,
    g_sb, g_st, g_sl,
    scale,
    KT: tl.constexpr, ACTIVATION: tl.constexpr, HAS_B_CONV: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    col_tiles = (CA + BLOCK_A - 1) // BLOCK_A
    tiles = (P + BLOCK_P - 1) // BLOCK_P
    cols = (pid % col_tiles).to(tl.int32) * BLOCK_A + tl.arange(0, BLOCK_A)
    col_mask = cols < CA
    frame = (pid // col_tiles) % T
    tile = ((pid // (col_tiles * T)) % tiles).to(tl.int32)
    batch = pid // (col_tiles * T * tiles)
    p = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    row_mask = p < P
    g_rows = batch * g_sb + frame * g_st + (prefix + p).to(tl.int64) * g_sl
    da = tl.zeros((BLOCK_P, BLOCK_A), tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        g = tl.load(grad_ptr + g_rows[:, None] + c[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
        w_up = tl.load(w_up_ptr + c[:, None] * CA + cols[None, :], mask=c_mask[:, None] & col_mask[None, :], other=0.0)
        da = matmul(g, w_up, da, DOT_PRECISION)
    z = conv_from_buffer(y_ptr, batch, frame, T, P, CA, p, row_mask, cols, col_mask, w_conv_ptr, b_conv_ptr,
                         KT, HAS_B_CONV)
    buf_mask = row_mask[:, None] & col_mask[None, :]
    buf = (((batch * T + frame) * P + p) * CA)[:, None] + cols[None, :]
    tl.store(a_buf_ptr + buf, activation_forward(z, ACTIVATION).to(a_buf_ptr.dtype.element_ty), mask=buf_mask)
    dz = scale * da
    if ACTIVATION != 0:
        dz = dz * activation_derivative(z, ACTIVATION)
    dz = tl.where(buf_mask, dz, 0.0)
    tl.store(dz_buf_ptr + buf, dz, mask=buf_mask)
    # The conv gradients' partial sums, laid out as the fused backward's: (B, T, groups, KT + 1, Ca).
    groups = (P + 15) // 16
    first_group = (batch * T + frame) * groups + tile * (BLOCK_P // 16)
    last_group = (batch * T + frame + 1) * groups
    for j in range(KT):
        source = frame + j - KT // 2
        ok = (source >= 0) & (source < T)
        y = tl.load(y_ptr + (((batch * T + source) * P + p) * CA)[:, None] + cols[None, :], mask=buf_mask & ok,
                    other=0.0)
        store_row_group_sums(conv_partial_ptr + j * CA, dz * y.to(tl.float32), first_group, last_group,
                             (KT + 1) * CA, cols, col_mask, BLOCK_P, BLOCK_A)
    store_row_group_sums(conv_partial_ptr + KT * CA, dz, first_group, last_group, (KT + 1) * CA, cols, col_mask,
                         BLOCK_P, BLOCK_A)
