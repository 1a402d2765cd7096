"""Measure the C++ CPU backend against its GEMM floor and the official ST-Adapter data flow.

    PYTHONPATH=. .venv/bin/python tools/measure_cpp.py [--dtypes fp32,bf16] [--bottlenecks 384,128]
        [--rounds 9] [--tile-sweep 49,66,98,196] [--batch 2] [--tokens 197] [--threads N]
        [--gemm-paths] [--no-call-cost] [--context] [--in-model]

Each ratio is printed with its target (met / NOT met): issue 4's, on a CPU with AMX issue 15's.
Every result names the CPU (model, and which of avx2 / avx512f / avx512_bf16 / avx512_fp16 /
amx_bf16 it has) and the GEMM path the cpp backend took (fused_cpp.gemm_path: brgemm/AMX,
brgemm/AVX-512, brgemm/AVX2, oneDNN, MKL float32). First, per GEMM dtype, the per-call cost of
torch.mm on one thread: one frame's 196-row GEMM against a sixteenth of one 16-frame GEMM, for
both GEMM shapes of the forward.
`--gemm-paths` also times the cpp backend on every GEMM path this CPU has (forced, as the tests
force them), and on an AVX-512 CPU its AVX2 copy of the kernels (fused_cpp.avx512 off).
`--context` times one clip's cpp forward (the model modes' adapter call) right after itself, after
a ViT-B MLP's two MKL GEMMs (the backbone's thread pool busy just before), and after touching
64 MiB (caches evicted); `--in-model` times the benchmark's 12-block model per provider (fused,
official, floor) part by part, with page faults, and the fused adapters alone on the inputs they
had there: the in-model slowdown question of issue 15.

ViT-B/16 adapter shapes (issue 4): B=2 videos x T=8 frames of L=197 tokens (prefix 1), C=768,
kt=3; --batch and --tokens change B and L (e.g. --batch 1 --tokens 50: one tile per frame).
For each dtype and Ca, in one process, every candidate runs once per round in a rotating order
(interleaved, so load from other processes hits all of them alike) and the medians over rounds
are compared:

    floor fwd      torch.mm on the forward's 2 GEMM shapes
    floor fwd+bwd  torch.mm on the 6 GEMM shapes of forward + backward
    fp32 floor     (bf16/fp16 only) the same GEMMs in float32, the precision the kernels compute in;
                   on a CPU without native 16-bit GEMMs (AVX2) the 16-bit torch.mm is a slow
                   fallback, not a lower bound: it is skipped and the fp32 floor is the floor;
                   where it is faster than the 16-bit torch.mm (Intel Xeon without AMX), it is the
                   floor too, the kernel then widening its GEMMs (fused_cpp.native_gemm)
    cpp            st_adapter(backend="cpp"): forward, and forward + autograd backward
    official       benchmarks.providers.OfficialAdapter: fc1, permute to channels-first
                   .contiguous(), depthwise Conv3d (3,1,1) over (T, 14, 14), permute back
                   .contiguous(), fc2, in-place residual (the official module)

`--tile-sweep` also times the raw stadapter_cpp ops at the given patch rows per tile.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import resource
import statistics
import time

import torch
from torch.func import functional_call

import stadapter_kernels as sk
from stadapter_kernels import fused_cpp
from benchmarks.host import cpu_info
from benchmarks.providers import OfficialAdapter

BATCH, FRAMES, TOKENS, PREFIX, CHANNELS, KERNEL_T = 2, 8, 197, 1, 768, 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# cpp / floor at most, and official / cpp at least (where an issue sets one), per (dtype, phase):
# issue 4's, and on a CPU with AMX (amx_bf16) issue 15's, which replace them there.
FLOOR_TARGETS = {(dtype, "fwd"): 1.10 for dtype in DTYPES} | {(dtype, "fwd+bwd"): 1.20 for dtype in DTYPES}
SPEEDUP_TARGETS = {("bf16", "fwd"): 1.4, ("bf16", "fwd+bwd"): 2.2, ("fp32", "fwd+bwd"): 1.3}
AMX_FLOOR_TARGETS = {("bf16", "fwd"): 1.3, ("bf16", "fwd+bwd"): 1.5, ("fp32", "fwd"): 1.10, ("fp32", "fwd+bwd"): 1.25}
AMX_SPEEDUP_TARGETS = {("bf16", "fwd"): 2.0, ("bf16", "fwd+bwd"): 2.5}


ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def cpu_description() -> str:
    """The CPU (model name, family and model numbers), which of ISA_FLAGS it has, torch's CPU capability."""
    cpu = cpu_info()
    have = [f for f in ISA_FLAGS if f in cpu.flags]
    lacks = [f for f in ISA_FLAGS if f not in cpu.flags]
    return (f"{cpu.name}; has {' '.join(have) or 'none of ' + ' '.join(ISA_FLAGS)}"
            + (f"; no {' '.join(lacks)}" if lacks else "") + f"; torch {torch.backends.cpu.get_cpu_capability()}")


@contextlib.contextmanager
def forced_gemm_path(dtype, native, use_brgemm):
    """The cpp backend's GEMM path for `dtype` while inside (as the tests force it)."""
    gemm_dtype = dtype if native else torch.float32
    saved = dict(fused_cpp.native_gemm), dict(fused_cpp.brgemm)
    if dtype != torch.float32:
        fused_cpp.native_gemm[dtype] = native
    fused_cpp.brgemm[gemm_dtype] = use_brgemm
    try:
        yield
    finally:
        fused_cpp.native_gemm.clear()
        fused_cpp.native_gemm.update(saved[0])
        fused_cpp.brgemm.clear()
        fused_cpp.brgemm.update(saved[1])


def gemm_call_cost(dtype, bottleneck, rounds, frames=16):
    """Per-call cost of torch.mm in `dtype` on one thread, for the forward's two GEMM shapes: one
    frame's GEMM (196 rows) minus a `frames`-th of one GEMM over `frames` frames' rows, in us."""
    patches, previous = TOKENS - PREFIX, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        costs = {}
        for name, (k, n) in {"down": (CHANNELS, bottleneck), "up": (bottleneck, CHANNELS)}.items():
            a, b = torch.randn(frames * patches, k).to(dtype), torch.randn(k, n).to(dtype)
            frame_rows = [a[f * patches:(f + 1) * patches] for f in range(frames)]
            m = interleaved_medians({"whole": timed(lambda: torch.mm(a, b)),
                                     "per frame": timed(lambda: [torch.mm(r, b) for r in frame_rows])}, rounds)
            costs[name] = (m["per frame"] / frames * 1e6, (m["per frame"] - m["whole"]) / frames * 1e6)
        return costs
    finally:
        torch.set_num_threads(previous)


def context_medians(dtype, bottleneck, rounds):
    """One clip's cpp forward timed alone, after the MLP GEMMs of a ViT-B block, after a cache flush."""
    inputs = make_inputs(dtype, bottleneck)
    x = inputs["x"][:FRAMES]
    params = {k: v for k, v in inputs.items() if k != "x"}
    hidden = torch.randn(FRAMES * TOKENS, CHANNELS).to(dtype)
    w_in, w_out = torch.randn(CHANNELS, 4 * CHANNELS).to(dtype), torch.randn(4 * CHANNELS, CHANNELS).to(dtype)
    flush = torch.empty(64 << 20, dtype=torch.uint8)

    def adapter():
        start = time.perf_counter()
        with torch.no_grad():
            cpp_flow(x, params, FRAMES)
        return time.perf_counter() - start

    def after(before):
        def run():
            before()
            return adapter()
        return run

    return interleaved_medians({"after itself": after(adapter),
                                "after MLP GEMMs": after(lambda: torch.mm(torch.mm(hidden, w_in), w_out)),
                                "after 64 MiB flush": after(lambda: flush.add_(1))}, rounds)


def in_model_medians(dtype, rounds, depth=12):
    """Inference of the benchmark's whole model (benchmarks.model: `depth` ViT-B/16 blocks with a
    pre-MLP adapter each, 1 clip x 8 frames) per provider, interleaved in one process: the whole
    pass, each part of the blocks summed over the blocks, the minor page faults of a pass, and the
    adapters replayed alone on the inputs they had in the model (what the adapter costs out of
    the model's context). Medians over rounds, in seconds (faults: a count)."""
    from benchmarks import config
    from benchmarks.model import build_model
    from stadapter.inject import CHILD_NAMES, adapted_blocks

    clips = torch.randn(1, 3, FRAMES, 224, 224, generator=torch.Generator().manual_seed(3)).to(dtype)
    spent, captured, models = {}, {}, {}

    def timed_part(module, part, index):
        forward = module.forward

        def run(*args, **kwargs):
            start = time.perf_counter()
            result = forward(*args, **kwargs)
            spent[part] = spent.get(part, 0.0) + time.perf_counter() - start
            if part == "adapter":
                captured[index] = (forward, args)
            return result

        module.forward = run

    for provider in ("fused", "official", "floor"):
        model = build_model(provider, config.ModelConfig(depth=depth, clips=1), dtype, "cpu", []).eval()
        for index, block in adapted_blocks(model):
            for part, module in (("attention", block.attn), ("adapter", getattr(block, CHILD_NAMES["pre_mlp"])),
                                 ("mlp", block.mlp)):
                timed_part(module, part, index)
        models[provider] = model

    def run_model(provider):
        def run():
            spent.clear()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            models[provider](clips)
            spent["model"] = time.perf_counter() - start
            spent["faults"] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            return dict(spent)
        return run

    with torch.no_grad():
        samples = interleaved_samples({provider: run_model(provider) for provider in models}, rounds)
        run_model("fused")()  # the fused adapters' inputs, captured
        replay = timed(lambda: [forward(*args) for forward, args in captured.values()])
        alone = [replay() for _ in range(rounds)]
    medians = {provider: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
               for provider, runs in samples.items()}
    medians["fused"]["adapters alone"] = statistics.median(alone)
    return medians


def verdict(value, target, at_most=False):
    if target is None:
        return ""
    met = value <= target if at_most else value >= target
    return f"({'<=' if at_most else '>='} {target}: {'met' if met else 'NOT met'})"


def make_inputs(dtype, bottleneck, seed=0, batch=None):
    """x (B * T, L, C) and the adapter's parameters, by name: B = BATCH unless `batch` is given."""
    generator = torch.Generator().manual_seed(seed)
    batch = BATCH if batch is None else batch

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator) * std).to(dtype)

    return dict(
        x=randn(batch * FRAMES, TOKENS, CHANNELS),
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


def interleaved_samples(candidates: dict, rounds: int) -> dict:
    """Each candidate's results over `rounds` rounds, every candidate once per round in a rotating
    order, after one untimed call each (allocator, MKL buffers, lazy init)."""
    for run in candidates.values():
        run()
    samples = {name: [] for name in candidates}
    names = list(candidates)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(candidates[name]())
    return samples


def interleaved_medians(candidates: dict, rounds: int) -> dict:
    return {name: statistics.median(s) for name, s in interleaved_samples(candidates, rounds).items()}


def raw_op(inputs, tile, backward):
    """The stadapter_cpp ops directly on the (B, T, L, C) view, at a forced tiling."""
    x = inputs["x"].unflatten(0, (BATCH, FRAMES))
    params = [inputs[k] for k in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    out = torch.empty_like(x)
    options = (PREFIX, "identity", 1.0, tile)
    # The GEMM path st_adapter would take (native or widened bf16/fp16 GEMMs).
    native = fused_cpp.native_gemm.get(x.dtype, False)

    use_brgemm = fused_cpp.gemm_path(x.dtype, CHANNELS, params[0].shape[0]).startswith("brgemm")

    def run():
        start = time.perf_counter()
        torch.ops.stadapter_cpp.st_adapter_forward(out, x, *params, None, *options, native, use_brgemm, True,
                                                   fused_cpp.avx512)
        if backward:
            torch.ops.stadapter_cpp.st_adapter_backward(torch.empty_like(x), x, x, *params, None, *options,
                                                        native, use_brgemm, True, fused_cpp.avx512)
        return time.perf_counter() - start

    return run


def _forced_run(run, dtype, native, use_brgemm):
    with forced_gemm_path(dtype, native, use_brgemm):
        return run()


def _avx2_copy_run(run):
    """run() on the AVX2 copy of the kernels (where the AVX-512 one is the default)."""
    fused_cpp.avx512 = False
    try:
        return run()
    finally:
        fused_cpp.avx512 = True


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
    parser.add_argument("--gemm-paths", action="store_true",
                        help="also time the cpp backend on every GEMM path this CPU has")
    parser.add_argument("--no-call-cost", action="store_true", help="skip the per-call torch.mm cost")
    parser.add_argument("--in-model", action="store_true",
                        help="also time the benchmark's 12-block model per provider, part by part, and its "
                             "adapters alone on their in-model inputs")
    parser.add_argument("--context", action="store_true",
                        help="also time one clip's cpp forward after itself, after MKL GEMMs, after a cache flush")
    args = parser.parse_args()
    BATCH, TOKENS = args.batch, args.tokens
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}")
    amx = "amx_bf16" in cpu_info().flags  # which issue's targets judge the ratios
    floor_targets = AMX_FLOOR_TARGETS if amx else FLOOR_TARGETS
    speedup_targets = AMX_SPEEDUP_TARGETS if amx else SPEEDUP_TARGETS
    print(f"threads={torch.get_num_threads()} B={BATCH} T={FRAMES} L={TOKENS} C={CHANNELS} kt={KERNEL_T}, "
          f"medians of {args.rounds} interleaved rounds")
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        if args.in_model:
            m = in_model_medians(dtype, args.rounds)
            print(f"\n[{cpu_description()}] {dtype_name} whole model, inference, 12 blocks, 1 clip x {FRAMES} frames, "
                  f"Ca 384 (ms, medians of {args.rounds} interleaved rounds):")
            for provider, parts in m.items():
                rest = parts["model"] - parts["attention"] - parts["adapter"] - parts["mlp"]
                print(f"  {provider:8s} model {parts['model'] * 1e3:7.1f} = attention {parts['attention'] * 1e3:6.1f} + "
                      f"adapters {parts['adapter'] * 1e3:6.1f} + mlp {parts['mlp'] * 1e3:6.1f} + rest {rest * 1e3:5.1f}; "
                      f"{parts['faults']:.0f} page faults")
            added = {p: (m[p]["model"] - m["floor"]["model"]) * 1e3 for p in ("fused", "official")}
            print(f"  over the backbone alone: fused +{added['fused']:.1f} ms ({added['fused'] / 12:.1f} per adapter), "
                  f"official +{added['official']:.1f} ms; the fused adapters take {m['fused']['adapter'] * 1e3:.1f} ms "
                  f"in the model, {m['fused']['adapters alone'] * 1e3:.1f} ms alone on the same inputs")
        # On a CPU without native 16-bit GEMMs, torch.mm in that dtype is a slow fallback: no floor.
        native_floor = dtype == torch.float32 or fused_cpp.cpu_has_native_gemm(dtype)
        for bottleneck in map(int, args.bottlenecks.split(",")):
            path = fused_cpp.gemm_path(dtype, CHANNELS, bottleneck)
            if not args.no_call_cost:
                for gemm_dtype in dict.fromkeys((dtype if native_floor else torch.float32, torch.float32)):
                    costs = gemm_call_cost(gemm_dtype, bottleneck, args.rounds)
                    print(f"\n[{cpu_description()}] torch.mm {str(gemm_dtype).removeprefix('torch.')} per call, "
                          "one thread, 196 rows: " + ", ".join(
                              f"{name} {per_call:.0f} us ({overhead:+.0f} us vs 1/16 of 16 frames at once)"
                              for name, (per_call, overhead) in costs.items()))
            if args.context:
                m = context_medians(dtype, bottleneck, args.rounds)
                print(f"\n[{cpu_description()}] {dtype_name} Ca={bottleneck} one clip's cpp forward ({path}): "
                      + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in m.items()))
            inputs = make_inputs(dtype, bottleneck)
            candidates = {
                "cpp fwd": timed_flow(cpp_flow, inputs, backward=False),
                "cpp fwd+bwd": timed_flow(cpp_flow, inputs, backward=True),
                "official fwd": timed_flow(official_flow, inputs, backward=False),
                "official fwd+bwd": timed_flow(official_flow, inputs, backward=True),
            }
            if native_floor:
                candidates["floor fwd"] = timed(gemm_floor(dtype, bottleneck, backward=False))
                candidates["floor fwd+bwd"] = timed(gemm_floor(dtype, bottleneck, backward=True))
            if dtype != torch.float32:
                # The kernels compute in float32 whatever the dtype: its GEMMs are the attainable floor.
                candidates["fp32 floor fwd"] = timed(gemm_floor(torch.float32, bottleneck, backward=False))
                candidates["fp32 floor fwd+bwd"] = timed(gemm_floor(torch.float32, bottleneck, backward=True))
                if not native_floor:
                    candidates["floor fwd"], candidates["floor fwd+bwd"] = (
                        candidates.pop("fp32 floor fwd"), candidates.pop("fp32 floor fwd+bwd"))
            if args.gemm_paths:
                for native, use_brgemm in fused_cpp.available_gemm_paths(dtype, CHANNELS, bottleneck):
                    with forced_gemm_path(dtype, native, use_brgemm):
                        name = fused_cpp.gemm_path(dtype, CHANNELS, bottleneck)
                    for phase, backward in (("fwd", False), ("fwd+bwd", True)):
                        run = timed_flow(cpp_flow, inputs, backward=backward)
                        widened = " widened" if dtype != torch.float32 and not native else ""
                        candidates[f"cpp[{name}{widened}] {phase}"] = (
                            lambda run=run, native=native, use_brgemm=use_brgemm:
                            _forced_run(run, dtype, native, use_brgemm))
                if fused_cpp.avx512:  # the element-wise work at half the width, on the default GEMM path
                    for phase, backward in (("fwd", False), ("fwd+bwd", True)):
                        candidates[f"cpp[AVX2 copy] {phase}"] = functools.partial(
                            _avx2_copy_run, timed_flow(cpp_flow, inputs, backward=backward))
            for tile in filter(None, args.tile_sweep.split(",")):
                candidates[f"tile {tile} fwd"] = raw_op(inputs, int(tile), backward=False)
                candidates[f"tile {tile} fwd+bwd"] = raw_op(inputs, int(tile), backward=True)
            m = interleaved_medians(candidates, args.rounds)
            floor_name = "torch.mm" if native_floor else "torch.mm in float32 (no native 16-bit GEMMs)"
            print(f"\n{dtype_name} Ca={bottleneck} [{cpu_description()}] cpp GEMM path {path}, floor {floor_name}: "
                  + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in m.items()))
            for phase in ("fwd", "fwd+bwd"):
                # The floor is the faster way to run the GEMMs: where float32 torch.mm beats the 16-bit
                # one, the kernel may widen (fused_cpp.native_gemm), and float32 is the floor.
                if native_floor and m.get(f"fp32 floor {phase}", float("inf")) < m[f"floor {phase}"]:
                    m[f"floor {phase}"] = m[f"fp32 floor {phase}"]
                    print(f"  {phase:8s} floor: torch.mm in float32, faster than in {dtype_name} on this CPU")
                floor_ratio, speedup = m[f"cpp {phase}"] / m[f"floor {phase}"], m[f"official {phase}"] / m[f"cpp {phase}"]
                print(f"  {phase:8s} cpp / floor = {floor_ratio:.3f} "
                      f"{verdict(floor_ratio, floor_targets.get((dtype_name, phase)), True)}   "
                      f"official / cpp = {speedup:.2f}x {verdict(speedup, speedup_targets.get((dtype_name, phase)))}"
                      + (f"   cpp / fp32 floor = {m[f'cpp {phase}'] / m[f'fp32 floor {phase}']:.3f}"
                         if f"fp32 floor {phase}" in m else ""))
            for name in (k.removesuffix(" fwd") for k in m if k.startswith("cpp[") and k.endswith(" fwd")):
                print(f"  {name}: fwd / floor = {m[f'{name} fwd'] / m['floor fwd']:.3f}, "
                      f"fwd+bwd / floor = {m[f'{name} fwd+bwd'] / m['floor fwd+bwd']:.3f}")
            for tile in filter(None, args.tile_sweep.split(",")):
                print(f"  tile {tile}: fwd / floor = {m[f'tile {tile} fwd'] / m['floor fwd']:.3f}, "
                      f"fwd+bwd / floor = {m[f'tile {tile} fwd+bwd'] / m['floor fwd+bwd']:.3f}")


if __name__ == "__main__":
    main()
