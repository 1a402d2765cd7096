"""Modelled HBM traffic, L2 re-reads, FLOPs and H100 time floors: both Triton variants and the eager chain.

    PYTHONPATH=. .venv/bin/python tools/model_h100.py [--B 8 --T 8 --L 197 --C 768 --Ca 384 --dtype bf16]

A model, not a measurement (no GPU ran it): each kernel is listed with the global-memory bytes it
must move from HBM, the bytes it re-reads that should come from L2, and its FLOPs; the floor of
a chain is max(total FLOPs / peak, total HBM bytes / bandwidth) on `benchmarks.config.H100`. The
GPU check holds each measured kernel against these rows. Assumptions, stated so they can be
checked against the kernels:

- Eager = the official ST-Adapter data flow (benchmarks.providers.OfficialAdapter) as a lower
  bound: every kernel reads its inputs and writes its outputs once, and the copies PyTorch makes
  of the strided x[:, 1:] slice (for the GEMMs) are not counted, which only favours eager.
- Fused (fused_triton "fused"): the persistent programs' scratch rings stay in L2; their real
  size (programs by occupancy x tiles x BLOCK_P x CA_PAD, `fused_triton.scratch_elements`) is
  printed, to hold against the L2 (50 MB on H100, 40 MB on A100). T chunks re-project kt - 1
  halo frames per interior chunk boundary (FLOPs counted; their x re-reads counted as L2).
- Two-GEMM (fused_triton "two_gemm"): y makes one round trip through HBM (written by K1, read
  by K2); K2 rebuilds the conv and activation of its BLOCK_A chunks in every one of its
  C / BLOCK_C programs per row tile (FLOPs counted), re-reading the kt y tiles from L2.
- Weights (about 1 MB) are read from HBM once per kernel and from L2 by every tile. The split-K
  weight-gradient GEMM reads each token tile once per bottleneck block and each bottleneck tile
  once per channel block: once from HBM, the rest from L2.
- The backward of eager recomputes nothing; both variants recompute y (one extra GEMM), and the
  transient buffers a (dtype), dz (fp32), dy (dtype) go through HBM.
"""

from __future__ import annotations

import argparse
import math

import torch


from benchmarks.config import H100
from stadapter_kernels import fused_triton
from stadapter_kernels.fused_triton import configs

ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
PEAK = {"bf16": "bfloat16", "fp16": "float16", "fp32": "tf32"}
#: SMs and threads per SM of the modelled H100 SXM (the persistent grid's size).
H100_SMS, H100_THREADS_PER_SM = 132, 2048


def h100_programs(config: configs.TileConfig) -> int:
    return H100_SMS * configs.programs_per_sm(config, H100_THREADS_PER_SM)


def ring_bytes(kernel: str, B: int, T: int, P: int, Ca: int, kt: int, e: int) -> tuple[int, int]:
    """(allocated, touched by the first config) bytes of a persistent kernel's scratch on an H100."""
    candidates = configs.SHIPPED[(kernel, configs.ca_pad(Ca))]
    tiles = kt + 1 if kernel == "forward" else kt
    programs = {c: h100_programs(c) for c in candidates}
    allocated = max(programs[c] * c.block_p for c in candidates) * tiles * configs.ca_pad(Ca) * e
    first = candidates[0]
    items = B * math.ceil(P / first.block_p) * math.ceil(T / frames_per_chunk(B, T, P, kt))
    touched = min(programs[first], items) * first.block_p * tiles * configs.ca_pad(Ca) * e
    return allocated, touched


def frames_per_chunk(B, T, P, kt) -> int:
    return fused_triton.frames_per_chunk(B, T, P, kt, h100_programs(configs.SHIPPED[("forward", 16)][0]))


def chains(B, T, L, C, Ca, kt, dtype):
    """{(chain, mode): [(kernel, HBM bytes read + written, L2 re-read bytes, FLOPs)]}."""
    e = ELEMENT[dtype]
    P = L - 1
    N = B * T * P  # patch tokens
    X, Xp = B * T * L * C * e, N * C * e  # all tokens, patch tokens of x (or of any (.., C) tensor)
    Y, Y32 = N * Ca * e, N * Ca * 4  # a bottleneck tensor in the dtype and in fp32
    W = (2 * C * Ca + Ca * kt + 2 * Ca + C) * e
    gemm = 2 * N * C * Ca
    conv = 2 * N * Ca * kt
    chunks = math.ceil(T / frames_per_chunk(B, T, P, kt))
    halo = (chunks - 1) * (kt - 1) / T  # extra projected frames per frame, from the T chunks
    block_a = configs.block_a(Ca, {2: torch.bfloat16, 4: torch.float32}[e])
    a_chunks = math.ceil(Ca / block_a)

    eager_forward = [
        ("fc1 GEMM", Xp + Y + W / 2, 0, gemm),
        ("permute to channels-first", 2 * Y, 0, 0),
        ("depthwise Conv3d", 2 * Y, 0, conv),
        ("permute back", 2 * Y, 0, 0),
        ("fc2 GEMM", Y + Xp + W / 2, 0, gemm),
        ("in-place residual add", 3 * Xp, 0, N * C),
    ]
    eager_backward = [
        ("fc2 dgrad GEMM", Xp + Y, 0, gemm),
        ("fc2 wgrad GEMM + bias", 2 * Xp + Y, 0, gemm),
        ("permute grad", 2 * Y, 0, 0),
        ("Conv3d dgrad", 2 * Y, 0, conv),
        ("Conv3d wgrad + bias", 3 * Y, 0, conv),
        ("permute grad back", 2 * Y, 0, 0),
        ("fc1 dgrad GEMM", Y + Xp, 0, gemm),
        ("fc1 wgrad GEMM + bias", 2 * Y + Xp, 0, gemm),
        ("dx = g + pad(dx_p)", 2 * X + Xp, 0, N * C),
    ]

    fused_cfg = configs.SHIPPED[("forward", configs.ca_pad(Ca))][0]
    c_steps = math.ceil(C / fused_cfg.block_c)
    weight_l2 = W * N / fused_cfg.block_p  # every (tile, frame) reads both weights
    fused_forward = [(
        "forward (fused, one kernel)", 2 * X + W,
        # x per bottleneck chunk + residual + halo frames, the ring (y written, read kt times),
        # the activated tile once per C step, the weights per tile and frame
        Xp * (a_chunks * (1 + halo)) + Y * (1 + kt) + Y * (1 + c_steps) + weight_l2,
        gemm * (1 + halo) + gemm + conv + N * C)]
    fused_backward = [
        ("backward_bottleneck (recompute y, z, a; da, dz)", 2 * Xp + Y + Y32 + W,
         Xp * a_chunks * (1 + halo) + Xp * (a_chunks - 1) + Y * (1 + 2 * kt) + weight_l2,
         gemm * (1 + halo) + gemm + 2 * conv),
        ("backward_input (dy, dx)", Y32 + X + Y + X + W / 2, Y32 * (kt - 1) + Y * c_steps, gemm + conv),
    ]

    up_cfg = configs.SHIPPED[("up_gemm", configs.ca_pad(Ca))][0]
    c_tiles = math.ceil(C / up_cfg.block_c)
    y_fwd = Y  # y in the inputs' dtype (float32 only in the backward of relu, not modelled here)
    two_gemm_forward = [
        ("down_gemm (K1: y = x W_down^T + b + cond)", Xp + y_fwd + W / 2, Xp * (a_chunks - 1), gemm),
        ("up_gemm (K2: conv + act prologue, residual epilogue)", y_fwd + 2 * X + W / 2,
         y_fwd * (kt * c_tiles - 1), gemm + (conv + N * Ca) * c_tiles + N * C),
    ]
    two_gemm_backward = [
        ("down_gemm (recompute y)", Xp + y_fwd + W / 2, Xp * (a_chunks - 1), gemm),
        ("dz_gemm (da = g W_up; dz, a and conv partials in the epilogue)", Xp + y_fwd + Y + Y32 + W / 2,
         Xp * (a_chunks - 1) + y_fwd * (2 * kt - 1), gemm + 2 * conv),
        ("backward_input (dy, dx)", Y32 + X + Y + X + W / 2, Y32 * (kt - 1) + Y * c_steps, gemm + conv),
    ]

    outer = configs.OUTER_PRODUCT[e]
    weight_gradients = [
        (f"weight gradient: {name}", Xp + Y, Xp * (math.ceil(Ca / outer.block_a) - 1)
         + Y * (math.ceil(C / outer.block_c) - 1), gemm)
        for name in ("fc2", "fc1")]
    return {
        ("eager", "forward"): eager_forward,
        ("fused", "forward"): fused_forward,
        ("two_gemm", "forward"): two_gemm_forward,
        ("eager", "forward + backward"): eager_forward + eager_backward,
        ("fused", "forward + backward"): fused_forward + fused_backward + weight_gradients,
        ("two_gemm", "forward + backward"): two_gemm_forward + two_gemm_backward + weight_gradients,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--B", type=int, default=8, help="videos (default 8)")
    parser.add_argument("--T", type=int, default=8, help="frames (default 8)")
    parser.add_argument("--L", type=int, default=197, help="tokens per frame, one class token (default 197)")
    parser.add_argument("--C", type=int, default=768, help="width (default 768)")
    parser.add_argument("--Ca", type=int, default=384, help="bottleneck (default 384)")
    parser.add_argument("--kt", type=int, default=3, help="temporal kernel (default 3)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(ELEMENT))
    args = parser.parse_args(argv)

    peak = H100.flops[PEAK[args.dtype]]
    e = ELEMENT[args.dtype]
    P = args.L - 1
    print(f"MODELLED on {H100.name} ({H100.bandwidth / 1e12:.1f} TB/s, {peak / 1e12:.0f} TFLOP/s {PEAK[args.dtype]}, "
          f"{H100_SMS} SMs): B={args.B} T={args.T} L={args.L} C={args.C} Ca={args.Ca} kt={args.kt} {args.dtype}")
    length = frames_per_chunk(args.B, args.T, P, args.kt)
    print(f"fused: {length} frame(s) per work item ({math.ceil(args.T / length)} T chunk(s))")
    for kernel in ("forward", "backward_bottleneck"):
        config = configs.SHIPPED[(kernel, configs.ca_pad(args.Ca))][0]
        allocated, touched = ring_bytes(kernel, args.B, args.T, P, args.Ca, args.kt, e)
        print(f"fused {kernel} scratch ring: {allocated / 1e6:.1f} MB allocated, {touched / 1e6:.1f} MB touched by "
              f"{config.name} ({h100_programs(config)} programs)")
    print()
    floors = {}
    for (chain, mode), kernels in chains(args.B, args.T, args.L, args.C, args.Ca, args.kt, args.dtype).items():
        nbytes = sum(k[1] for k in kernels)
        l2 = sum(k[2] for k in kernels)
        flops = sum(k[3] for k in kernels)
        compute_us, memory_us = flops / peak * 1e6, nbytes / H100.bandwidth * 1e6
        floors[(chain, mode)] = max(compute_us, memory_us)
        print(f"{chain} {mode}: {len(kernels)} kernel(s), {nbytes / 1e6:.1f} MB HBM, {l2 / 1e6:.1f} MB L2 re-reads, "
              f"{flops / 1e9:.1f} GFLOP -> floor {floors[(chain, mode)]:.1f} us "
              f"({'memory' if memory_us > compute_us else 'compute'}-bound; memory {memory_us:.1f} us, "
              f"compute {compute_us:.1f} us)")
        for name, kernel_bytes, kernel_l2, kernel_flops in kernels:
            print(f"    {name:62s} {kernel_bytes / 1e6:8.1f} MB {kernel_l2 / 1e6:8.1f} MB L2 "
                  f"{kernel_flops / 1e9:7.2f} GFLOP")
    print()
    for mode in ("forward", "forward + backward"):
        for variant in ("fused", "two_gemm"):
            print(f"{mode}: eager floor / {variant} floor = {floors[('eager', mode)] / floors[(variant, mode)]:.2f}x")


if __name__ == "__main__":
    main()
