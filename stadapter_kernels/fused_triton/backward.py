"""The fused backward kernels: nothing of the forward is saved but x; the bottleneck is recomputed.

Three kernels (four launches), each reading the large tensors (x, grad_out) once:

1. `st_adapter_backward_bottleneck_kernel` walks T like the forward (same persistent grid and
   ring of bottleneck tiles), recomputes y, z and a = act(z), computes
   da = scale * grad_out @ w_up and dz = da * act'(z), BLOCK_A channels at a time, and writes a
   and dz to transient (tokens x Ca) buffers that live only for this backward call. The conv
   weight and bias gradients need the window of y, so they are accumulated here into one fp32
   partial row per program.
2. `st_adapter_backward_input_kernel` applies the transposed temporal conv to dz
   (dy[t] = sum_j w_conv[:, j] * dz[t - j + kt//2]), writes dy, and computes
   dx = grad_out + dy @ w_down fused with the residual gradient (prefix tokens are copied),
   reading dy back BLOCK_A channels at a time.
   It also writes fp32 per-program partial sums of dy (for the fc1 bias and cond gradients)
   and of grad_out (for the fc2 bias gradient).
3. `token_outer_product_kernel` is a split-K GEMM over tokens, sum_n A[n, :]^T B[n, :], that
   reads the strided (B, T, L, C) token tensor with no copy: dW_up = scale * grad_out^T a and
   dW_down^T = x^T dy. Each split writes an fp32 partial.

Every partial is reduced by torch.sum in a fixed order, so all gradients are deterministic
(no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (activation_derivative, activation_forward, copy_prefix_tile, matmul, ring_offsets,
                     store_next_frame, temporal_conv)


@triton.jit
def st_adapter_backward_bottleneck_kernel(
    x_ptr, grad_ptr, w_down_ptr, b_down_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, cond_ptr,
    a_buf_ptr, dz_buf_ptr, conv_partial_ptr, scratch_ptr,
    B, T, P, C, CA, prefix, scratch_per_program, partial_rows,
    x_sb, x_st, x_sl, g_sb, g_st, g_sl,
    scale,
    KT: tl.constexpr, CA_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_B_DOWN: tl.constexpr, HAS_B_CONV: tl.constexpr, HAS_COND: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid = tl.program_id(0)
    ring_ptr = scratch_ptr + pid.to(tl.int64) * scratch_per_program
    tiles_per_video = (P + BLOCK_P - 1) // BLOCK_P
    half = KT // 2
    rows = tl.arange(0, BLOCK_P)
    ca = tl.arange(0, CA_PAD)
    ca_mask = ca < CA
    # This program's partial conv gradients, summed over all its work items: (KT + 1, Ca), the
    # taps then the bias, kept in the fp32 partial buffer itself (each program owns its row).
    # Rows past the launched programs are zeroed too, so every launch writes the whole buffer
    # whatever grid its config gives (autotuning runs several on the same buffer).
    for row in range(pid, partial_rows, tl.num_programs(0)):
        for j in tl.static_range(KT + 1):
            tl.store(conv_partial_ptr + (row * (KT + 1) + j) * CA + ca, tl.zeros((CA_PAD,), tl.float32), mask=ca_mask)
    partial_ptr = conv_partial_ptr + pid.to(tl.int64) * (KT + 1) * CA
    for work in range(pid, B * tiles_per_video, tl.num_programs(0)):
        batch = work // tiles_per_video
        b = batch.to(tl.int64)
        p = (work % tiles_per_video) * BLOCK_P + rows
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        x_rows = b * x_sb + token * x_sl
        g_rows = b * g_sb + token * g_sl
        buf_rows = (b * T * P + p) * CA  # rows of frame 0 in the contiguous (B, T, P, Ca) buffers
        for f in tl.static_range(KT - 1):
            store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, b * 0 + f - half, T, x_st, w_down_ptr, b_down_ptr,
                             cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD, BLOCK_C,
                             BLOCK_A, DOT_PRECISION)
        for t in range(T):
            frame = b * 0 + t  # int64, so frame * stride cannot overflow
            store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, frame + half, T, x_st, w_down_ptr, b_down_ptr,
                             cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD, BLOCK_C,
                             BLOCK_A, DOT_PRECISION)
            tl.debug_barrier()  # the ring slot stored above is read by other threads
            for a0 in range(0, CA, BLOCK_A):
                cols = a0 + tl.arange(0, BLOCK_A)
                col_mask = cols < CA
                da = tl.zeros((BLOCK_P, BLOCK_A), tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    c_mask = c < C
                    g = tl.load(grad_ptr + (g_rows + frame * g_st)[:, None] + c[None, :],
                                mask=row_mask[:, None] & c_mask[None, :], other=0.0)
                    w_up = tl.load(w_up_ptr + c[:, None] * CA + cols[None, :],
                                   mask=c_mask[:, None] & col_mask[None, :], other=0.0)
                    da = matmul(g, w_up, da, DOT_PRECISION)
                z = temporal_conv(ring_ptr, frame, w_conv_ptr, b_conv_ptr, cols, CA, KT, HAS_B_CONV, BLOCK_P, CA_PAD)
                buf_mask = row_mask[:, None] & col_mask[None, :]
                frame_buf = (buf_rows + frame * P * CA)[:, None] + cols[None, :]
                tl.store(a_buf_ptr + frame_buf, activation_forward(z, ACTIVATION).to(a_buf_ptr.dtype.element_ty),
                         mask=buf_mask)
                dz = scale * da
                if ACTIVATION != 0:
                    dz = dz * activation_derivative(z, ACTIVATION)
                dz = tl.where(buf_mask, dz, 0.0)
                tl.store(dz_buf_ptr + frame_buf, dz, mask=buf_mask)
                # dL/dw_conv[:, j] gets dz[t] * y[t + j - kt//2]; the y tiles come back from the ring.
                # Each program owns its partial row, so this read-modify-write races with no one.
                for j in range(KT):
                    y = tl.load(ring_ptr + ring_offsets(frame + j - half, KT, BLOCK_P, CA_PAD, cols))
                    tap = tl.load(partial_ptr + j * CA + cols, mask=col_mask)
                    tl.store(partial_ptr + j * CA + cols, tap + tl.sum(dz * y.to(tl.float32), axis=0), mask=col_mask)
                bias = tl.load(partial_ptr + KT * CA + cols, mask=col_mask)
                tl.store(partial_ptr + KT * CA + cols, bias + tl.sum(dz, axis=0), mask=col_mask)
            tl.debug_barrier()  # the next frame overwrites a ring slot read above


@triton.jit
def st_adapter_backward_input_kernel(
    grad_ptr, dx_ptr, w_down_ptr, w_conv_ptr, dz_buf_ptr, dy_buf_ptr, dy_partial_ptr, grad_partial_ptr,
    T, P, C, CA, prefix, partial_tiles,
    g_sb, g_st, g_sl, dx_sb, dx_st, dx_sl,
    KT: tl.constexpr, CA_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
):
    tile = tl.program_id(0)
    t = tl.program_id(1)
    batch = tl.program_id(2)
    prefix_tiles = (prefix + BLOCK_P - 1) // BLOCK_P
    if tile < prefix_tiles:
        if t == 0:
            copy_prefix_tile(grad_ptr, dx_ptr, tile, batch, T, C, prefix, g_sb, g_st, g_sl, dx_sb, dx_st, dx_sl,
                             BLOCK_P, BLOCK_C)
    else:
        patch_tile = tile - prefix_tiles
        b = batch.to(tl.int64)
        frame = t.to(tl.int64)
        p = patch_tile * BLOCK_P + tl.arange(0, BLOCK_P)
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        buf_rows = (b * T * P + p) * CA
        half = KT // 2
        # Partials are (B, T, partial_tiles, .): partial_tiles >= the tiles of this launch, and
        # the last tile zeroes the rows past it, so every launch writes the whole buffer.
        partial_row = (b * T + frame) * partial_tiles + patch_tile
        if patch_tile == (P + BLOCK_P - 1) // BLOCK_P - 1:
            for unused_row in range(partial_row + 1, (b * T + frame + 1) * partial_tiles):
                for a0 in range(0, CA, BLOCK_A):
                    cols = a0 + tl.arange(0, BLOCK_A)
                    tl.store(dy_partial_ptr + unused_row * CA + cols, tl.zeros((BLOCK_A,), tl.float32), mask=cols < CA)
                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    tl.store(grad_partial_ptr + unused_row * C + c, tl.zeros((BLOCK_C,), tl.float32), mask=c < C)

        # dy[t] = sum_j w_conv[:, j] * dz[t - j + kt//2], BLOCK_A channels at a time, into dy_buf.
        for a0 in range(0, CA, BLOCK_A):
            cols = a0 + tl.arange(0, BLOCK_A)
            col_mask = cols < CA
            dy = tl.zeros((BLOCK_P, BLOCK_A), tl.float32)
            for tap in range(KT):
                source = frame - tap + half  # the frame whose z read y[t] through this tap
                source_ok = (source >= 0) & (source < T)
                dz = tl.load(dz_buf_ptr + (buf_rows + source * P * CA)[:, None] + cols[None, :],
                             mask=row_mask[:, None] & col_mask[None, :] & source_ok, other=0.0)
                w = tl.load(w_conv_ptr + cols * KT + tap, mask=col_mask, other=0.0).to(tl.float32)
                dy += w[None, :] * dz
            tl.store(dy_partial_ptr + partial_row * CA + cols, tl.sum(dy, axis=0), mask=col_mask)
            tl.store(dy_buf_ptr + (buf_rows + frame * P * CA)[:, None] + cols[None, :],
                     dy.to(dy_buf_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
        tl.debug_barrier()  # dy is read back whole by every thread below

        g_rows = b * g_sb + frame * g_st + token * g_sl
        dx_rows = b * dx_sb + frame * dx_st + token * dx_sl
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            mask = row_mask[:, None] & c_mask[None, :]
            g = tl.load(grad_ptr + g_rows[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
            dx = g
            for a0 in range(0, CA, BLOCK_A):
                cols = a0 + tl.arange(0, BLOCK_A)
                col_mask = cols < CA
                dy_chunk = tl.load(dy_buf_ptr + (buf_rows + frame * P * CA)[:, None] + cols[None, :],
                                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                w_down = tl.load(w_down_ptr + cols[:, None] * C + c[None, :], mask=col_mask[:, None] & c_mask[None, :],
                                 other=0.0)
                dx = matmul(dy_chunk, w_down, dx, DOT_PRECISION)
            tl.store(dx_ptr + dx_rows[:, None] + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            tl.store(grad_partial_ptr + partial_row * C + c, tl.sum(g, axis=0), mask=c_mask)


@triton.jit
def token_outer_product_kernel(
    tokens_ptr, buf_ptr, partial_ptr,
    T, P, C, CA, prefix, N, tokens_per_split,
    t_sb, t_st, t_sl,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
):
    """partial[split, c, a] = sum over this split's tokens n of tokens[n, c] * buf[n, a].

    `tokens` is a strided (B, T, L, C) tensor whose patch tokens (after `prefix`) are the rows,
    in (b, t, p) order; `buf` is a contiguous (N, Ca) buffer in the same row order.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    a = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    split = tl.program_id(2)
    c_mask = c < C
    a_mask = a < CA
    start = split.to(tl.int64) * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    acc = tl.zeros((BLOCK_C, BLOCK_A), tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_mask = n < end
        p = n % P
        frame = (n // P) % T
        b = n // (P * T)
        rows = b * t_sb + frame * t_st + (prefix + p) * t_sl
        lhs = tl.load(tokens_ptr + rows[None, :] + c[:, None], mask=c_mask[:, None] & n_mask[None, :], other=0.0)
        rhs = tl.load(buf_ptr + n[:, None] * CA + a[None, :], mask=n_mask[:, None] & a_mask[None, :], other=0.0)
        acc = matmul(lhs, rhs, acc, DOT_PRECISION)
    out = partial_ptr + (split.to(tl.int64) * C + c[:, None]) * CA + a[None, :]
    tl.store(out, acc, mask=c_mask[:, None] & a_mask[None, :])
