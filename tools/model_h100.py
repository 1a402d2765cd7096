"""Modelled HBM traffic, FLOPs and H100 time floors: the fused Triton kernels vs the eager chain.

    PYTHONPATH=. .venv/bin/python tools/model_h100.py [--B 8 --T 8 --L 197 --C 768 --Ca 384 --dtype bf16]

A model, not a measurement (no GPU ran it): each kernel is listed with the global-memory bytes it
must move, and the floor of a chain is max(total FLOPs / peak, total bytes / bandwidth) on
`benchmarks.config.H100`. Assumptions, stated so they can be checked against the kernels:

- Eager = the official ST-Adapter data flow (benchmarks.providers.OfficialAdapter) as a lower
  bound: every kernel reads its inputs and writes its outputs once, and the copies PyTorch makes
  of the strided x[:, 1:] slice (for the GEMMs) are not counted, which only favours eager.
- Fused = fused_triton: the per-program bottleneck rings live in L2 (programs x kt x BLOCK_P x
  CA_PAD elements, far below the token tensors) and are not HBM traffic; weights (about 1 MB)
  are read once. The split-K weight-gradient kernel reads each token tile once per bottleneck
  block and each bottleneck tile once per channel block: "fused, no L2 reuse" counts every one
  of those reads, "fused" counts them once (concurrent programs of one split share them in L2).
- The backward of both recomputes nothing in eager and y, z, a in fused (one extra GEMM).
"""

from __future__ import annotations

import argparse
import math

from benchmarks.config import H100
from stadapter_kernels.fused_triton import configs

ELEMENT = {"bf16": 2, "fp16": 2, "fp32": 4}
PEAK = {"bf16": "bfloat16", "fp16": "float16", "fp32": "tf32"}


def chains(B, T, L, C, Ca, kt, dtype):
    """{chain: [(kernel, bytes read + written, FLOPs)]} for forward and forward + backward."""
    e = ELEMENT[dtype]
    P = L - 1
    N, M = B * T * P, B * T * L  # patch tokens, all tokens
    X, Xp = M * C * e, N * C * e  # all tokens, patch tokens of x (or of any (.., C) tensor)
    Y, Y32 = N * Ca * e, N * Ca * 4  # a bottleneck tensor in the dtype and in fp32
    W = (2 * C * Ca + Ca * kt + 2 * Ca + C) * e
    gemm = 2 * N * C * Ca
    conv = 2 * N * Ca * kt

    eager_forward = [
        ("fc1 GEMM", Xp + Y + W / 2, gemm),
        ("permute to channels-first", 2 * Y, 0),
        ("depthwise Conv3d", 2 * Y, conv),
        ("permute back", 2 * Y, 0),
        ("fc2 GEMM", Y + Xp + W / 2, gemm),
        ("in-place residual add", 3 * Xp, N * C),
    ]
    eager_backward = [
        ("fc2 dgrad GEMM", Xp + Y, gemm),
        ("fc2 wgrad GEMM + bias", 2 * Xp + Y, gemm),
        ("permute grad", 2 * Y, 0),
        ("Conv3d dgrad", 2 * Y, conv),
        ("Conv3d wgrad + bias", 3 * Y, conv),
        ("permute grad back", 2 * Y, 0),
        ("fc1 dgrad GEMM", Y + Xp, gemm),
        ("fc1 wgrad GEMM + bias", 2 * Y + Xp, gemm),
        ("dx = g + pad(dx_p)", 2 * X + Xp, N * C),
    ]
    fused_forward = [("st_adapter_forward_kernel", 2 * X + W, 2 * gemm + conv + N * C)]

    splits_c = math.ceil(C / configs.OUTER_PRODUCT[e].block_c)
    splits_a = math.ceil(Ca / configs.OUTER_PRODUCT[e].block_a)

    def fused_backward(reuse):
        token_reads, bottleneck_reads = (1, 1) if reuse else (splits_a, splits_c)
        return [
            ("backward_bottleneck (recompute y, z, a; da, dz)", 2 * Xp + Y + Y32 + W, 2 * gemm + 2 * conv),
            ("backward_input (dy, dx)", Y32 + X + Y + X + W / 2, gemm + conv),
            ("weight gradient: fc2", token_reads * Xp + bottleneck_reads * Y, gemm),
            ("weight gradient: fc1", token_reads * Xp + bottleneck_reads * Y, gemm),
        ]

    return {
        ("eager", "forward"): eager_forward,
        ("fused", "forward"): fused_forward,
        ("eager", "forward + backward"): eager_forward + eager_backward,
        ("fused", "forward + backward"): fused_forward + fused_backward(reuse=True),
        ("fused, no L2 reuse", "forward + backward"): fused_forward + fused_backward(reuse=False),
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
    print(f"MODELLED on {H100.name} ({H100.bandwidth / 1e12:.1f} TB/s, {peak / 1e12:.0f} TFLOP/s {PEAK[args.dtype]}): "
          f"B={args.B} T={args.T} L={args.L} C={args.C} Ca={args.Ca} kt={args.kt} {args.dtype}\n")
    floors = {}
    for (chain, mode), kernels in chains(args.B, args.T, args.L, args.C, args.Ca, args.kt, args.dtype).items():
        nbytes = sum(k[1] for k in kernels)
        flops = sum(k[2] for k in kernels)
        compute_us, memory_us = flops / peak * 1e6, nbytes / H100.bandwidth * 1e6
        floors[(chain, mode)] = max(compute_us, memory_us)
        print(f"{chain} {mode}: {len(kernels)} kernel(s), {nbytes / 1e6:.1f} MB, {flops / 1e9:.1f} GFLOP -> "
              f"floor {floors[(chain, mode)]:.1f} us ({'memory' if memory_us > compute_us else 'compute'}-bound; "
              f"memory {memory_us:.1f} us, compute {compute_us:.1f} us)")
        for name, kernel_bytes, kernel_flops in kernels:
            print(f"    {name:52s} {kernel_bytes / 1e6:8.1f} MB {kernel_flops / 1e9:7.2f} GFLOP")
    print()
    for mode in ("forward", "forward + backward"):
        for fused in ("fused", "fused, no L2 reuse"):
            if (fused, mode) in floors:
                print(f"{mode}: eager floor / {fused} floor = {floors[('eager', mode)] / floors[(fused, mode)]:.2f}x")


if __name__ == "__main__":
    main()
