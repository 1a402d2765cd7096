"""The fused forward kernel: the whole adapter in one launch.

Each program owns BLOCK_P patch positions of one video and walks its T frames. At frame t it
computes the down-projection of frame t + kt//2 (the only new bottleneck tile it needs) and
keeps the kt - 1 older tiles in registers, a rolling window over T: so x is read from HBM
once for the down-projection, the bottleneck never leaves the chip, and the output is written
once. The residual re-reads the frame-t tile of x, which the program read kt//2 frames earlier
(an L2 hit for the tile sizes shipped). Programs with pid 0 .. prefix_tiles-1 copy the prefix
tokens through instead.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import activation_forward, copy_prefix_tile, down_projection, matmul, temporal_conv


@triton.jit
def st_adapter_forward_kernel(
    x_ptr, out_ptr, w_down_ptr, b_down_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, b_up_ptr, cond_ptr,
    T, P, C, CA, prefix,
    x_sb, x_st, x_sl, out_sb, out_st, out_sl,
    scale,
    KT: tl.constexpr, CA_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_B_DOWN: tl.constexpr, HAS_B_CONV: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_COND: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    tile = tl.program_id(0)
    batch = tl.program_id(1)
    prefix_tiles = (prefix + BLOCK_P - 1) // BLOCK_P
    if tile < prefix_tiles:
        copy_prefix_tile(x_ptr, out_ptr, tile, batch, T, C, prefix, x_sb, x_st, x_sl, out_sb, out_st, out_sl,
                         BLOCK_P, BLOCK_C)
    else:
        b = batch.to(tl.int64)
        p = (tile - prefix_tiles) * BLOCK_P + tl.arange(0, BLOCK_P)
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        x_rows = b * x_sb + token * x_sl
        out_rows = b * out_sb + token * out_sl
        ca = tl.arange(0, CA_PAD)
        ca_mask = ca < CA
        window_dtype = x_ptr.dtype.element_ty
        half = KT // 2

        # The window: y[t-2], y[t-1], y[t], y[t+1] at the start of iteration t (those KT reads).
        zero = tl.zeros((BLOCK_P, CA_PAD), window_dtype)
        y_m2 = zero
        y_m1 = zero
        y_0 = zero
        y_p1 = zero
        if KT >= 3:
            y_0 = down_projection(x_ptr, x_rows, row_mask, b * 0, T, w_down_ptr, b_down_ptr, cond_ptr, batch, C,
                                  CA, HAS_B_DOWN, HAS_COND, CA_PAD, BLOCK_C, DOT_PRECISION).to(window_dtype)
        if KT == 5:
            y_p1 = down_projection(x_ptr, x_rows + x_st, row_mask, b * 0 + 1, T, w_down_ptr, b_down_ptr, cond_ptr,
                                   batch, C, CA, HAS_B_DOWN, HAS_COND, CA_PAD, BLOCK_C,
                                   DOT_PRECISION).to(window_dtype)
        for t in range(T):
            frame = b * 0 + t  # int64, so frame * stride cannot overflow
            y_new = down_projection(x_ptr, x_rows + (frame + half) * x_st, row_mask, frame + half, T, w_down_ptr,
                                    b_down_ptr, cond_ptr, batch, C, CA, HAS_B_DOWN, HAS_COND, CA_PAD, BLOCK_C,
                                    DOT_PRECISION).to(window_dtype)
            if KT == 1:
                z = temporal_conv(zero, zero, y_new, zero, zero, w_conv_ptr, b_conv_ptr, CA, KT, HAS_B_CONV, CA_PAD)
            elif KT == 3:
                z = temporal_conv(zero, y_m1, y_0, y_new, zero, w_conv_ptr, b_conv_ptr, CA, KT, HAS_B_CONV, CA_PAD)
            else:
                z = temporal_conv(y_m2, y_m1, y_0, y_p1, y_new, w_conv_ptr, b_conv_ptr, CA, KT, HAS_B_CONV, CA_PAD)
            a = activation_forward(z, ACTIVATION).to(window_dtype)

            for c0 in range(0, C, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_mask = c < C
                w_up = tl.load(w_up_ptr + c[None, :] * CA + ca[:, None],
                               mask=c_mask[None, :] & ca_mask[:, None], other=0.0)
                up = matmul(a, w_up, None, DOT_PRECISION)
                if HAS_B_UP:
                    up += tl.load(b_up_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
                mask = row_mask[:, None] & c_mask[None, :]
                x = tl.load(x_ptr + (x_rows + frame * x_st)[:, None] + c[None, :], mask=mask, other=0.0)
                out = x.to(tl.float32) + scale * up
                tl.store(out_ptr + (out_rows + frame * out_st)[:, None] + c[None, :], out.to(window_dtype), mask=mask)

            if KT == 3:
                y_m1 = y_0
                y_0 = y_new
            if KT == 5:
                y_m2 = y_m1
                y_m1 = y_0
                y_0 = y_p1
                y_p1 = y_new
