"""Measure the C++ CPU backend against its GEMM floor and the official ST-Adapter data flow.

    PYTHONPATH=. .venv/bin/python tools/measure_cpp.py [--dtypes fp32,bf16] [--bottlenecks 384,128]
        [--rounds 9] [--tile-sweep 49,66,98,196] [--batch 2] [--tokens 197] [--threads N]

Each ratio is printed with issue 4's target for it (met / NOT met).

ViT-B/16 adapter shapes (issue 4): B=2 videos x T=8 frames of L=197 tokens (prefix 1), C=768,
kt=3; --batch and --tokens change B and L (e.g. --batch 1 --tokens 50: one tile per frame).
For each dtype and Ca, in one process, every candidate runs once per round in a rotating order
(interleaved, so load from other processes hits all of them alike) and the medians over rounds
are compared:

    floor fwd      torch.mm on the forward's 2 GEMM shapes
    floor fwd+bwd  torch.mm on the 6 GEMM shapes of forward + backward
    fp32 floor     (bf16/fp16 only) the same GEMMs in float32, the precision the kernels compute in
    cpp            st_adapter(backend="cpp"): forward, and forward + autograd backward
    official       benchmarks.providers.OfficialAdapter: fc1, permute to channels-first
                   .contiguous(), depthwise Conv3d (3,1,1) over (T, 14, 14), permute back
                   .contiguous(), fc2, in-place residual (the official module)

`--tile-sweep` also times the raw stadapter_cpp ops at the given patch rows per tile.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch.func import functional_call

import stadapter_kernels as sk
from stadapter_kernels import fused_cpp
from benchmarks.providers import OfficialAdapter

BATCH, FRAMES, TOKENS, PREFIX, CHANNELS, KERNEL_T = 2, 8, 197, 1, 768, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Issue 4's targets: cpp / floor at most, and official / cpp at least (where the issue sets one).
FLOOR_TARGETS = {"fwd": 1.10, "fwd+bwd": 1.20}
SPEEDUP_TARGETS = {("bf16", "fwd"): 1.4, ("bf16", "fwd+bwd"): 2.2, ("fp32", "fwd+bwd"): 1.3}


def verdict(value, target, at_most=False):
    if target is None:
        return ""
    met = value <= target if at_most else value >= target
    return f"({'<=' if at_most else '>='} {target}: {'met' if met else 'NOT met'})"


def make_inputs(dtype, bottleneck, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    return dict(
        x=randn(BATCH * FRAMES, TOKENS, CHANNELS),
        fc1_weight=randn(bottleneck, CHANNELS, std=CHANNELS ** -0.5), fc1_bias=randn(bottleneck, std=0.1),
        conv_weight=randn(bottleneck, 1, KERNEL_T, 1, 1, std=KERNEL_T ** -0.5), conv_bias=randn(bottleneck, std=0.1),
        fc2_weight=randn(CHANNELS, bottleneck, std=bottleneck ** -0.5), fc2_bias=randn(CHANNELS, std=0.1),
    )


def official_flow(x, p, frames):
    """The official ST-Adapter module (the benchmark suite's re-implementation), with these weights."""
    weights = {name.replace("_", ".", 1): value for name, value in p.items()}  # fc1_weight -> fc1.weight
    return functional_call(official_module(p["fc1_weight"].shape[0]), weights, (x, frames))


@functools.lru_cache
def official_module(bottleneck):
    return OfficialAdapter(CHANNELS, bottleneck, KERNEL_T)


def cpp_flow(x, p, frames):
    return sk.st_adapter(x, p["fc1_weight"], p["fc1_bias"], p["conv_weight"], p["conv_bias"], p["fc2_weight"],
                         p["fc2_bias"], num_frames=frames, prefix=PREFIX, backend="cpp")


def gemm_floor(dtype, bottleneck, backward):
    """The GEMMs of the forward (and backward) alone, as torch.mm on the same shapes."""
    rows = BATCH * FRAMES * (TOKENS - PREFIX)
    x, a = torch.randn(rows, CHANNELS).to(dtype), torch.randn(rows, bottleneck).to(dtype)
    w_down, w_up = torch.randn(CHANNELS, bottleneck).to(dtype), torch.randn(bottleneck, CHANNELS).to(dtype)

    def run():
        torch.mm(x, w_down)  # y = x @ fc1.T
        torch.mm(a, w_up)  # up = a @ fc2.T
        if backward:
            torch.mm(x, w_down)  # da = g @ fc2
            torch.mm(x.t(), a)  # d fc2 = g.T @ a
            torch.mm(a, w_up)  # dx = dy @ fc1
            torch.mm(a.t(), x)  # d fc1 = dy.T @ x

    return run


def timed_flow(flow, inputs, backward):
    """One forward (+ backward) of `flow` on fresh copies; only the flow itself is timed."""
    frames = FRAMES

    def run():
        params = {k: v.detach().requires_grad_(backward) for k, v in inputs.items() if k != "x"}
        leaf = inputs["x"].detach().requires_grad_(backward)
        # The official flow adds in place, as on a previous layer's output: give it a non-leaf.
        x = leaf.clone() if flow is official_flow else leaf
        grad = torch.ones_like(inputs["x"]) if backward else None
        start = time.perf_counter()
        out = flow(x, params, frames)
        if backward:
            torch.autograd.grad(out, [leaf, *params.values()], grad)
        return time.perf_counter() - start

    return run


def timed(fn):
    def run():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return run


def interleaved_medians(candidates: dict, rounds: int) -> dict:
    for run in candidates.values():  # warm-up: allocator, MKL buffers, lazy init
        run()
    samples = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(candidates[name]())
    return {name: statistics.median(s) for name, s in samples.items()}


def raw_op(inputs, tile, backward):
    """The stadapter_cpp ops directly on the (B, T, L, C) view, at a forced tiling."""
    x = inputs["x"].unflatten(0, (BATCH, FRAMES))
    params = [inputs[k] for k in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    out = torch.empty_like(x)
    options = (PREFIX, "identity", 1.0, tile)
    # The GEMM path st_adapter would take (native or widened bf16/fp16 GEMMs).
    native = fused_cpp.native_gemm.get(x.dtype, False)

    def run():
        start = time.perf_counter()
        torch.ops.stadapter_cpp.st_adapter_forward(out, x, *params, None, *options, native)
        if backward:
            torch.ops.stadapter_cpp.st_adapter_backward(torch.empty_like(x), x, x, *params, None, *options,
                                                        native)
        return time.perf_counter() - start

    return run


def main():
    global BATCH, TOKENS  # the shape every helper above reads; --batch and --tokens set it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--bottlenecks", default="384,128")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--tile-sweep", default="", help="comma-separated patch rows per tile to time")
    parser.add_argument("--batch", type=int, default=BATCH, help="videos B (default %(default)s)")
    parser.add_argument("--tokens", type=int, default=TOKENS,
                        help="tokens per frame L, a class token and a square grid (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    BATCH, TOKENS = args.batch, args.tokens
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} B={BATCH} T={FRAMES} L={TOKENS} C={CHANNELS} kt={KERNEL_T}, "
          f"medians of {args.rounds} interleaved rounds")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        for bottleneck in map(int, args.bottlenecks.split(",")):
            inputs = make_inputs(dtype, bottleneck)
            candidates = {
                "floor fwd": timed(gemm_floor(dtype, bottleneck, backward=False)),
                "floor fwd+bwd": timed(gemm_floor(dtype, bottleneck, backward=True)),
                "cpp fwd": timed_flow(cpp_flow, inputs, backward=False),
                "cpp fwd+bwd": timed_flow(cpp_flow, inputs, backward=True),
                "official fwd": timed_flow(official_flow, inputs, backward=False),
                "official fwd+bwd": timed_flow(official_flow, inputs, backward=True),
            }
            if dtype != torch.float32:
                # The kernels compute in float32 whatever the dtype: its GEMMs are the attainable floor.
                candidates["fp32 floor fwd"] = timed(gemm_floor(torch.float32, bottleneck, backward=False))
                candidates["fp32 floor fwd+bwd"] = timed(gemm_floor(torch.float32, bottleneck, backward=True))
            for tile in filter(None, args.tile_sweep.split(",")):
                candidates[f"tile {tile} fwd"] = raw_op(inputs, int(tile), backward=False)
                candidates[f"tile {tile} fwd+bwd"] = raw_op(inputs, int(tile), backward=True)
            m = interleaved_medians(candidates, args.rounds)
            print(f"\n{dtype_name} Ca={bottleneck}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items()))
            for phase in ("fwd", "fwd+bwd"):
                floor_ratio, speedup = m[f"cpp {phase}"] / m[f"floor {phase}"], m[f"official {phase}"] / m[f"cpp {phase}"]
                print(f"  {phase:8s} cpp / floor = {floor_ratio:.3f} {verdict(floor_ratio, FLOOR_TARGETS[phase], True)}   "
                      f"official / cpp = {speedup:.2f}x {verdict(speedup, SPEEDUP_TARGETS.get((dtype_name, phase)))}"
                      + (f"   cpp / fp32 floor = {m[f'cpp {phase}'] / m[f'fp32 floor {phase}']:.3f}"
                         if f"fp32 floor {phase}" in m else ""))
            for tile in filter(None, args.tile_sweep.split(",")):
                print(f"  tile {tile}: fwd / floor = {m[f'tile {tile} fwd'] / m['floor fwd']:.3f}, "
                      f"fwd+bwd / floor = {m[f'tile {tile} fwd+bwd'] / m['floor fwd+bwd']:.3f}")


if __name__ == "__main__":
    main()
