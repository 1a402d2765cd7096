"""The fused forward kernel: the whole adapter in one launch.

A persistent grid: each program takes work items (one video's tile of BLOCK_P patch positions
and one chunk of `frames_per_chunk` consecutive frames) and walks the chunk's frames. Before
the chunk's first frame it projects the kt//2 halo frames on either side that the conv reads
(zeros outside [0, T)); at frame t it down-projects frame t + kt//2, the only new bottleneck
tile z[t] needs, into its ring of kt tiles (see common.py); reads the ring back BLOCK_A
channels at a time to apply the conv, cond-shifted bias and activation; and streams the
up-projection and residual over C. Every y tile is computed by the same code whichever chunk
projects it, so any chunking gives the same bits; chunks only add parallelism where B x patch
tiles is small (batch 1). x is read from HBM once per chunk for the down-projection (the
residual re-reads the tile read kt//2 frames earlier, from L2), the bottleneck only ever lives
in registers and the program's few-KiB scratch, and the output is written once. Work items
0 .. prefix_tiles-1 of each video copy its prefix tokens through instead (write zeros there,
and no residual, under residual=False).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (activation_forward, chunk_item, copy_prefix_tile, matmul, store_next_frame, store_up_projection,
                     temporal_conv)


@triton.jit
def st_adapter_forward_kernel(
    x_ptr, out_ptr, w_down_ptr, b_down_ptr, w_conv_ptr, b_conv_ptr, w_up_ptr, b_up_ptr, cond_ptr, scratch_ptr,
    B, T, P, C, CA, prefix, frames_per_chunk,
    x_sb, x_st, x_sl, out_sb, out_st, out_sl,
    scale,
    KT: tl.constexpr, CA_PAD: tl.constexpr, ACTIVATION: tl.constexpr,
    HAS_B_DOWN: tl.constexpr, HAS_B_CONV: tl.constexpr, HAS_B_UP: tl.constexpr, HAS_COND: tl.constexpr,
    RESIDUAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_A: tl.constexpr,
):
    pid = tl.program_id(0)
    # Each program's scratch: the ring of KT tiles and the activated tile.
    ring_ptr = scratch_ptr + pid.to(tl.int64) * ((KT + 1) * BLOCK_P * CA_PAD)
    a_tile_ptr = ring_ptr + KT * BLOCK_P * CA_PAD  # the activated bottleneck of the current frame
    prefix_tiles = (prefix + BLOCK_P - 1) // BLOCK_P
    chunks = (T + frames_per_chunk - 1) // frames_per_chunk
    items_per_video = prefix_tiles + chunks * ((P + BLOCK_P - 1) // BLOCK_P)
    half = KT // 2
    rows = tl.arange(0, BLOCK_P)
    for work in range(pid, B * items_per_video, tl.num_programs(0)):
        batch, tile, chunk = chunk_item(work, items_per_video, prefix_tiles, chunks)
        if tile < prefix_tiles:
            copy_prefix_tile(x_ptr, out_ptr, tile, batch, 0, T, C, prefix, x_sb, x_st, x_sl, out_sb, out_st, out_sl,
                             BLOCK_P, BLOCK_C, RESIDUAL)
        else:
            b = batch.to(tl.int64)
            p = (tile - prefix_tiles) * BLOCK_P + rows
            row_mask = p < P
            token = (prefix + p).to(tl.int64)
            x_rows = b * x_sb + token * x_sl
            out_rows = b * out_sb + token * out_sl
            t_start = chunk * frames_per_chunk
            t_end = tl.minimum(t_start + frames_per_chunk, T)
            # Fill the ring with frames t_start - kt//2 .. t_start + kt//2 - 1 (zeros outside [0, T)).
            for f in tl.static_range(KT - 1):
                store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, b * 0 + t_start + f - half, T, x_st, w_down_ptr,
                                 b_down_ptr, cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD,
                                 BLOCK_C, BLOCK_A, DOT_PRECISION)
            for t in range(t_start, t_end):
                frame = b * 0 + t  # int64, so frame * stride cannot overflow
                store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, frame + half, T, x_st, w_down_ptr, b_down_ptr,
                                 cond_ptr, batch, C, CA, KT, HAS_B_DOWN, HAS_COND, BLOCK_P, CA_PAD, BLOCK_C,
                                 BLOCK_A, DOT_PRECISION)
                tl.debug_barrier()  # the ring slot just written is read by other threads
                for a0 in range(0, CA, BLOCK_A):
                    cols = a0 + tl.arange(0, BLOCK_A)
                    z = temporal_conv(ring_ptr, frame, w_conv_ptr, b_conv_ptr, cols, CA, KT, HAS_B_CONV, BLOCK_P,
                                      CA_PAD)
                    a_offsets = rows[:, None] * CA_PAD + cols[None, :]
                    tl.store(a_tile_ptr + a_offsets, activation_forward(z, ACTIVATION).to(x_ptr.dtype.element_ty))
                tl.debug_barrier()  # the activated tile is read whole by every thread below

                for c0 in range(0, C, BLOCK_C):
                    c = c0 + tl.arange(0, BLOCK_C)
                    c_mask = c < C
                    up = tl.zeros((BLOCK_P, BLOCK_C), tl.float32)
                    for a0 in range(0, CA, BLOCK_A):
                        cols = a0 + tl.arange(0, BLOCK_A)
                        a = tl.load(a_tile_ptr + rows[:, None] * CA_PAD + cols[None, :])
                        w_up = tl.load(w_up_ptr + c[None, :] * CA + cols[:, None],
                                       mask=c_mask[None, :] & (cols < CA)[:, None], other=0.0)
                        up = matmul(a, w_up, up, DOT_PRECISION)
                    store_up_projection(up, b_up_ptr, c, c_mask, row_mask, scale, x_ptr, x_rows + frame * x_st,
                                        out_ptr, out_rows + frame * out_st, HAS_B_UP, RESIDUAL)
                # The next frame (or the next item's ring fill) overwrites the ring slot and the
                # activated tile read above; the barrier after its down-projection orders that
                # write after these reads, and the ring's last reads precede the barrier above.
