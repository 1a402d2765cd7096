"""The fused backward kernels: nothing of the forward is saved but x; the bottleneck is recomputed.

Three kernels (four launches), each reading the large tensors (x, grad_out) once:

1. `st_adapter_backward_bottleneck_kernel` walks T like the forward (same persistent grid of
   (video, patch tile, T chunk) items and ring of bottleneck tiles), recomputes y, z and
   a = act(z), computes da = scale * grad_out @ w_up and dz = da * act'(z), BLOCK_A channels at
   a time, and writes a and dz to transient (tokens x Ca) buffers that live only for this
   backward call. The conv weight and bias gradients need the window of y, so their fp32
   partial sums are written here, one row per (video, frame, 16 patch rows).
2. `st_adapter_backward_input_kernel` applies the transposed temporal conv to dz
   (dy[t] = sum_j w_conv[:, j] * dz[t - j + kt//2]), writes dy, and computes
   dx = grad_out + dy @ w_down fused with the residual gradient (prefix tokens are copied;
   under residual=False dx = dy @ w_down and zero on the prefix tokens),
   reading dy back BLOCK_A channels at a time.
   It also writes fp32 partial sums of dy (for the fc1 bias and cond gradients) and of
   grad_out (for the fc2 bias gradient), one row per (video, frame, 16 patch rows).
3. `token_outer_product_kernel` is a split-K GEMM over tokens, sum_n A[n, :]^T B[n, :], that
   reads the strided (B, T, L, C) token tensor with no copy: dW_up = scale * grad_out^T a and
   dW_down^T = x^T dy. Each split writes an fp32 partial.

Every partial row is a fixed pairwise sum of 16 patch rows (common.row_group_sums) and the
partials are reduced by torch.sum over a buffer whose shape depends on the problem alone, so
every gradient is the same bits for every config and T chunking, run after run (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (activation_derivative, activation_forward, chunk_item, copy_prefix_tile, matmul, ring_offsets,
                     store_next_frame, store_row_group_sums, temporal_conv)


@triton.jit
def st_adapter_backward_bottleneck_kernel(
    x_ptr, grad_ptr, w_down_ptr, b_down_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, cond_ptr,
    a_buf_ptr, dz_buf_ptr, conv_partial_ptr, scratch_ptr,
    B, T, P, C, CA, prefix, frames_per_chunk,
    x_sb, x_st, x_sl, g_sb, g_st, g_sl,
    scale,
    KT: tl.constexpr, CA_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_B_DOWN: tl.constexpr, HAS_B_CONV: tl.constexpr, HAS_COND: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
):
    pid = tl.program_id(0)
    ring_ptr = scratch_ptr + pid.to(tl.int64) * (KT * BLOCK_P * CA_PAD)  # this program's ring of KT tiles
    tiles_per_video = (P + BLOCK_P - 1) // BLOCK_P
    chunks = (T + frames_per_chunk - 1) // frames_per_chunk
    groups = (P + 15) // 16  # partial rows per frame: one per 16 patch rows (common.row_group_sums)
    half = KT // 2
    rows = tl.arange(0, BLOCK_P)
    for work in range(pid, B * tiles_per_video * chunks, tl.num_programs(0)):
        batch, tile, chunk = chunk_item(work, tiles_per_video * chunks, 0, chunks)
        b = batch.to(tl.int64)
        p = tile * BLOCK_P + rows
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        x_rows = b * x_sb + token * x_sl
        g_rows = b * g_sb + token * g_sl
        buf_rows = (b * T * P + p) * CA  # rows of frame 0 in the contiguous (B, T, P, Ca) buffers
        t_start = chunk * frames_per_chunk
        t_end = tl.minimum(t_start + frames_per_chunk, T)
        for f in tl.static_range(KT - 1):
            store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, b * 0 + t_start + f - half, T, x_st, w_down_ptr,
                             b_down_ptr, cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD,
                             BLOCK_C, BLOCK_A, DOT_PRECISION)
        for t in range(t_start, t_end):
            frame = b * 0 + t  # int64, so frame * stride cannot overflow
            store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, frame + half, T, x_st, w_down_ptr, b_down_ptr,
                             cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD, BLOCK_C,
                             BLOCK_A, DOT_PRECISION)
            tl.debug_barrier()  # the ring slot stored above is read by other threads
            # This frame's partial conv gradients: (KT + 1) rows (the taps, then the bias) per
            # 16 patch rows, (B, T, groups, KT + 1, Ca); each written by exactly one program.
            first_group = (b * T + frame) * groups + tile * (BLOCK_P // 16)
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
                for j in range(KT):
                    y = tl.load(ring_ptr + ring_offsets(frame + j - half, KT, BLOCK_P, CA_PAD, cols))
                    store_row_group_sums(conv_partial_ptr + j * CA, dz * y.to(tl.float32), first_group,
                                         (b * T + frame + 1) * groups, (KT + 1) * CA, cols, col_mask, BLOCK_P, BLOCK_A)
                store_row_group_sums(conv_partial_ptr + KT * CA, dz, first_group, (b * T + frame + 1) * groups,
                                     (KT + 1) * CA, cols, col_mask, BLOCK_P, BLOCK_A)
            tl.debug_barrier()  # the next frame overwrites a ring slot read above


@triton.jit
def st_adapter_backward_input_kernel(
    grad_ptr, dx_ptr, w_down_ptr, w_conv_ptr, dz_buf_ptr, dy_buf_ptr, dy_partial_ptr, grad_partial_ptr,
    T, P, C, CA, prefix,
    g_sb, g_st, g_sl, dx_sb, dx_st, dx_sl,
    KT: tl.constexpr, CA_PAD: tl.constexpr, RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
):
    # One program per (video, frame, tile) on a 1-D grid (grid y and z stop at 65,535).
    prefix_tiles = (prefix + BLOCK_P - 1) // BLOCK_P
    tiles = prefix_tiles + (P + BLOCK_P - 1) // BLOCK_P
    pid = tl.program_id(0).to(tl.int64)
    tile = (pid % tiles).to(tl.int32)
    t = (pid // tiles) % T
    batch = pid // (tiles * T)
    if tile < prefix_tiles:
        copy_prefix_tile(grad_ptr, dx_ptr, tile, batch, t, t + 1, C, prefix, g_sb, g_st, g_sl, dx_sb, dx_st, dx_sl,
                         BLOCK_P, BLOCK_C, RESIDUAL)
    else:
        patch_tile = tile - prefix_tiles
        b = batch
        frame = t
        p = patch_tile * BLOCK_P + tl.arange(0, BLOCK_P)
        row_mask = p < P
        token = (prefix + p).to(tl.int64)
        buf_rows = (b * T * P + p) * CA
        half = KT // 2
        # Partial sums per 16 patch rows: (B, T, groups, .), each row written by one program.
        groups = (P + 15) // 16
        first_group = (b * T + frame) * groups + patch_tile * (BLOCK_P // 16)
        last_group = (b * T + frame + 1) * groups

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
            store_row_group_sums(dy_partial_ptr, dy, first_group, last_group, CA, cols, col_mask, BLOCK_P, BLOCK_A)
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
            if RESIDUAL:
                dx = g  # the identity term
            else:
                dx = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
            for a0 in range(0, CA, BLOCK_A):
                cols = a0 + tl.arange(0, BLOCK_A)
                col_mask = cols < CA
                dy_chunk = tl.load(dy_buf_ptr + (buf_rows + frame * P * CA)[:, None] + cols[None, :],
                                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)
                w_down = tl.load(w_down_ptr + cols[:, None] * C + c[None, :], mask=col_mask[:, None] & c_mask[None, :],
                                 other=0.0)
                dx = matmul(dy_chunk, w_down, dx, DOT_PRECISION)
            tl.store(dx_ptr + dx_rows[:, None] + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
            store_row_group_sums(grad_partial_ptr, g, first_group, last_group, C, c, c_mask, BLOCK_P, BLOCK_C)


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
