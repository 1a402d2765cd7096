"""Triton helpers shared by the forward and backward kernels: activations, the down-projection,
the ring of bottleneck tiles and the temporal conv over it, and the prefix-token copy.

The rolling window over T lives in a per-program ring of KT bottleneck tiles in a small
scratch buffer (L1/L2-resident: programs x KT x BLOCK_P x CA_PAD elements, independent of the
token count), not in registers: Triton 3.8 keeps loop-carried tiles that feed a tl.dot in the
dot-operand layout, replicated across warps, which spills from Ca = 128 on. Writing and reading
the window in chunks of BLOCK_A channels keeps every live tile small at any Ca.

The bottleneck tile of one frame is (BLOCK_P, CA_PAD): CA_PAD is Ca rounded up to a power of
two (tl.arange needs one); the padded columns load zero weights, so they stay exactly zero
through the conv and every activation (act(0) = 0 for all of them) and contribute nothing.
Loops over the bottleneck run over range(0, Ca, BLOCK_A), so a chunk wholly in the padding is
never computed: Ca = 384 with BLOCK_A = 64 does no padded MMA work at all.

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
def down_projection(x_ptr, row_offsets, row_mask, frame, T, w_down_ptr, b_down_ptr, cond_ptr, batch, cols, C, CA,
                    HAS_B_DOWN: tl.constexpr, HAS_COND: tl.constexpr, BLOCK_C: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
    """y[frame][:, cols] = x @ w_down[cols].T + b_down + cond[batch] for one tile, fp32; zero when
    frame is outside [0, T), which is the conv's zero padding (bias and cond included).

    `row_offsets` (BLOCK_P,) are the int64 element offsets of the tile's rows in `frame`.
    """
    col_mask = cols < CA
    frame_ok = (frame >= 0) & (frame < T)
    acc = tl.zeros((row_offsets.shape[0], cols.shape[0]), dtype=tl.float32)
    if frame_ok:
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            c_mask = c < C
            x = tl.load(x_ptr + row_offsets[:, None] + c[None, :], mask=row_mask[:, None] & c_mask[None, :], other=0.0)
            w = tl.load(w_down_ptr + cols[None, :] * C + c[:, None], mask=col_mask[None, :] & c_mask[:, None],
                        other=0.0)
            acc = matmul(x, w, acc, DOT_PRECISION)
        if HAS_B_DOWN:
            acc += tl.load(b_down_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_COND:
            acc += tl.load(cond_ptr + batch.to(tl.int64) * CA + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def ring_offsets(frame, KT: tl.constexpr, BLOCK_P: tl.constexpr, CA_PAD: tl.constexpr, cols):
    """Offsets of frame's (BLOCK_P, len(cols)) slot in a program's ring of KT bottleneck tiles.

    The ring is (KT, BLOCK_P, CA_PAD), contiguous: frame f lives in slot f mod KT, so the KT
    frames t - kt//2 .. t + kt//2 that z[t] reads are all present once y[t + kt//2] is stored.
    """
    # int32: a 64-bit remainder compiles to a subroutine call with a stack frame. Frames before
    # 0 (the zero padding) have slots too.
    slot = ((frame.to(tl.int32) % KT) + KT) % KT
    rows = tl.arange(0, BLOCK_P)
    return (slot * BLOCK_P + rows)[:, None] * CA_PAD + cols[None, :]


@triton.jit
def temporal_conv(ring_ptr, frame, w_conv_ptr, b_conv_ptr, cols, CA,
                  KT: tl.constexpr, HAS_B_CONV: tl.constexpr, BLOCK_P: tl.constexpr, CA_PAD: tl.constexpr):
    """z[frame][:, cols] = sum_j w_conv[cols, j] * y[frame + j - kt//2][:, cols] (+ b_conv), fp32."""
    col_mask = cols < CA
    z = tl.zeros((BLOCK_P, cols.shape[0]), tl.float32)
    for tap in range(KT):  # not unrolled: one tap tile live at a time
        y = tl.load(ring_ptr + ring_offsets(frame + tap - KT // 2, KT, BLOCK_P, CA_PAD, cols))
        w = tl.load(w_conv_ptr + cols * KT + tap, mask=col_mask, other=0.0).to(tl.float32)
        z += w[None, :] * y.to(tl.float32)
    if HAS_B_CONV:
        z += tl.load(b_conv_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return z


@triton.jit
def store_up_projection(up, b_up_ptr, c, c_mask, row_mask, scale, x_ptr, x_offsets, out_ptr, out_offsets,
                        HAS_B_UP: tl.constexpr, RESIDUAL: tl.constexpr):
    """out[rows, c] = scale * (up + b_up) (+ x[rows, c] with RESIDUAL), in fp32, rounded once to out's
    dtype; x_offsets and out_offsets address each row's channel 0."""
    if HAS_B_UP:
        up += tl.load(b_up_ptr + c, mask=c_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & c_mask[None, :]
    out = scale * up
    if RESIDUAL:
        x = tl.load(x_ptr + x_offsets[:, None] + c[None, :], mask=mask, other=0.0)
        out += x.to(tl.float32)
    tl.store(out_ptr + out_offsets[:, None] + c[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def store_next_frame(ring_ptr, x_ptr, x_rows, row_mask, frame, T, x_st, w_down_ptr, b_down_ptr, cond_ptr, batch,
                     C, CA, KT: tl.constexpr, HAS_B_DOWN: tl.constexpr, HAS_COND: tl.constexpr,
                     BLOCK_P: tl.constexpr, CA_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_A: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Down-project `frame` (zeros outside [0, T)) into its ring slot, in x's dtype, BLOCK_A
    channels at a time (the x tiles are re-read per chunk from L1/L2, not HBM).

    `x_rows` are the int64 offsets of the tile's rows in frame 0; `frame` is int64.
    """
    for a0 in range(0, CA, BLOCK_A):
        cols = a0 + tl.arange(0, BLOCK_A)
        y = down_projection(x_ptr, x_rows + frame * x_st, row_mask, frame, T, w_down_ptr, b_down_ptr, cond_ptr,
                            batch, cols, C, CA, HAS_B_DOWN, HAS_COND, BLOCK_C, DOT_PRECISION)
        tl.store(ring_ptr + ring_offsets(frame, KT, BLOCK_P, CA_PAD, cols), y.to(ring_ptr.dtype.element_ty))


@triton.jit
def copy_prefix_tile(src_ptr, dst_ptr, prefix_tile, batch, t_start, t_end, C, prefix,
                     src_sb, src_st, src_sl, dst_sb, dst_st, dst_sl,
                     BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, COPY: tl.constexpr):
    """Copy one tile of prefix tokens (class/register tokens) of frames t_start .. t_end - 1 of
    one video; with COPY false (residual=False: no identity term) write zeros instead."""
    token = prefix_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    token_mask = token < prefix
    b = batch.to(tl.int64)
    src_rows = b * src_sb + token.to(tl.int64) * src_sl
    dst_rows = b * dst_sb + token.to(tl.int64) * dst_sl
    for t in range(t_start, t_end):
        frame = b * 0 + t  # int64, so frame * stride cannot overflow
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            mask = token_mask[:, None] & (c < C)[None, :]
            if COPY:
                v = tl.load(src_ptr + (src_rows + frame * src_st)[:, None] + c[None, :], mask=mask)
            else:
                v = tl.zeros((BLOCK_P, BLOCK_C), dst_ptr.dtype.element_ty)
            tl.store(dst_ptr + (dst_rows + frame * dst_st)[:, None] + c[None, :], v, mask=mask)


@triton.jit
def row_group_sums(v, BLOCK_P: tl.constexpr, WIDTH: tl.constexpr):
    """(BLOCK_P, WIDTH) fp32 -> (BLOCK_P // 16, WIDTH): each group of 16 rows (configs.ROW_GROUP) summed as a fixed
    pairwise tree ((r0 + r1) + (r2 + r3)) + ...

    Every step adds exactly two numbers, which IEEE addition does identically in either order,
    so the sums are the same bits whatever BLOCK_P, the warps or the register layout (a plain
    tl.sum over the rows is ordered by the layout, which changes with the config).
    """
    v = tl.sum(tl.reshape(v, (BLOCK_P // 2, 2, WIDTH)), axis=1)
    v = tl.sum(tl.reshape(v, (BLOCK_P // 4, 2, WIDTH)), axis=1)
    v = tl.sum(tl.reshape(v, (BLOCK_P // 8, 2, WIDTH)), axis=1)
    return tl.sum(tl.reshape(v, (BLOCK_P // 16, 2, WIDTH)), axis=1)


@triton.jit
def store_row_group_sums(ptr, v, first_group, groups, row_stride, cols, col_mask,
                         BLOCK_P: tl.constexpr, WIDTH: tl.constexpr):
    """Store row_group_sums(v) as rows first_group .. of a partial buffer with `row_stride`
    elements per row; groups past `groups` (rows past P) are not stored."""
    group = first_group + tl.arange(0, BLOCK_P // 16)
    sums = row_group_sums(v, BLOCK_P, WIDTH)
    tl.store(ptr + group.to(tl.int64)[:, None] * row_stride + cols[None, :], sums,
             mask=(group < groups)[:, None] & col_mask[None, :])


@triton.jit
def chunk_item(work, items_per_video, prefix_tiles, chunks):
    """(batch, tile, chunk) of a persistent work item: per video the prefix tiles first (chunk 0,
    they copy every frame), then each patch tile's T chunks, adjacent so the programs that
    share a tile's halo frames run together."""
    batch = work // items_per_video
    r = work % items_per_video
    is_patch = r >= prefix_tiles
    patch_item = r - prefix_tiles
    tile = tl.where(is_patch, patch_item // chunks + prefix_tiles, r)
    chunk = tl.where(is_patch, patch_item % chunks, 0)
    return batch, tile, chunk
