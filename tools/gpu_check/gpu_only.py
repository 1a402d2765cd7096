"""Step 3: what only a GPU can show (../shared/TRITON-REVIEW.md, "What a GPU run must show").

In order, most telling first, each an item (a table where it measures):

1. bit-equality: every shipped config of every kernel of each variant, autotuning's pick, T
   chunkings, and a second run, all give the same bits of the output and every gradient;
2. B = 1, 8, 32 (T = 8) of both variants against the eager reference and the floor, and which
   variant wins on this device: the entry `configs.AUTO_VARIANT` should get;
3. the fused variant's ring footprint: time and memory against the number of persistent programs;
4. each kernel of forward + backward timed alone (torch.profiler) against the bytes
   `tools/model_h100.py` models for it;
5. an int64 case: x past 2^31 elements, the last video checked against the float64 oracle;
6. CUDA-graph capture, warm (after an eager call) and cold (a shape never run before).

Shapes are the ViT-B/16 adapter's (L 197, C 768, Ca 384, kt 3) in bfloat16 unless said; the dry
run uses tiny ones in the interpreter, where CUDA graphs are not available.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.profiler import ProfilerActivity, profile

import stadapter_kernels as sk
import stadapter_kernels.fused_triton as launcher
from benchmarks import config, measure
from benchmarks.providers import Shape, micro_case
from stadapter_kernels.fused_triton import configs
from stadapter_kernels.reference import oracle
from tools import model_h100

from .parity import harness
from .results import budget_exhausted, environment_document, guarded

FRAMES = 8
#: What the dry run (device "cpu") runs is cut to one of each kind: it proves the code, and the
#: interpreter takes seconds per call.
BATCHES = {"cuda": (1, 8, 32), "cpu": (1,)}
#: T chunk lengths of the persistent kernels' work items compared for bit-equality.
CHUNKINGS = {"cuda": (1, 2, FRAMES), "cpu": (1,)}
#: Alternative configs compared for bit-equality: all, or in a dry run those of the first kernel.
ALTERNATIVES = {"cuda": None, "cpu": 1}
#: Profiled forward + backward calls, after this many untimed ones.
PROFILED_CALLS = {"cuda": 5, "cpu": 1}
PROFILER_WARMUP = {"cuda": 2, "cpu": 0}
#: Elements of one tensor past which 32-bit offsets overflow.
INT32_LIMIT = 2**31
#: Widths (C) of the cold CUDA-graph shapes, one per variant so neither finds the other's
#: autotuning done (backward_input is shared); no other check uses them.
COLD_WIDTHS = {"fused": 512, "two_gemm": 640}
#: Profiled kernel names whose model entries are named otherwise.
MODEL_ALIASES = {"token_outer_product": "weight gradient"}
#: Rows of the batch sweep are (dtype, mode, B, reference, floor, *variants, winner, winner x floor).
SWEEP_VARIANT_COLUMN = 5


def adapter_case(context, **changes):
    """The ViT-B/16 adapter (B 2, T 8, gelu, cond, biases) as a parity.Case; tiny in a dry run.
    gelu with cond is also step 1's ViT-B case, so its kernels are compiled already."""
    parity = harness()
    if context.dry_run:
        base = parity.Case(batch=1, frames=2, tokens=8, channels=16, bottleneck=16)
    else:
        base = parity.Case(batch=2, frames=FRAMES, tokens=197, channels=768, bottleneck=384)
    return base.with_(kernel_t=3, prefix=1, activation="gelu", cond=True, dtype=torch.bfloat16).with_(**changes)


def bench_shape(context, batch: int):
    """A benchmarks Shape of batch `batch`: the quick sweep's ViT-B/16 adapter, tiny in a dry run."""
    if context.dry_run:
        return Shape(B=batch, T=2, L=10, C=32, Ca=16)
    return Shape(B=batch, T=FRAMES, L=197, C=768, Ca=384)


def forward_backward(case, inputs: dict, grad_out) -> dict:
    """Output and every gradient of one backend="triton" call, by name."""
    parity = harness()
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    out = parity.call(sk.st_adapter, {n: leaves.get(n) for n in parity.INPUT_NAMES}, case, backend="triton")
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return {"out": out.detach(), **{f"d_{name}": g for name, g in zip(leaves, grads)}}


def differing(first: dict, second: dict) -> list[str]:
    return [name for name in first if not torch.equal(first[name], second[name])]


def _inputs(case, device: str, seed: int = 0):
    parity = harness()
    inputs = parity.make_inputs(case, device, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(inputs["x"].shape, generator=generator, dtype=torch.float64).to(case.dtype).to(device)
    return inputs, grad_out


# 1. bit-equality -------------------------------------------------------------------------------

def bit_equality(context, variant: str, dtype) -> dict:
    case = adapter_case(context, dtype=dtype)
    inputs, grad_out = _inputs(case, context.device)
    ca_pad = configs.ca_pad(case.bottleneck)
    shipped = {kernel: [c.name for c in configs.SHIPPED[(kernel, ca_pad)]] for kernel in configs.VARIANT_KERNELS[variant]}
    first = {kernel: names[0] for kernel, names in shipped.items()}
    runs = [("first configs", first, None), ("first configs, run again", first, None), ("autotuned", {}, None)]
    alternatives = [(f"{kernel}={name}", {**first, kernel: name}, None)
                    for kernel, names in shipped.items() for name in names[1:]]
    runs += alternatives[:ALTERNATIVES[context.device]]
    runs += [(f"frames_per_chunk={chunk}", first, chunk) for chunk in CHUNKINGS[context.device]]
    baseline, mismatches = None, []
    for label, kernel_configs, chunk in runs:
        with configs.forced(variant=variant, frames_per_chunk=chunk, **kernel_configs):
            result = forward_backward(case, inputs, grad_out)
        if baseline is None:
            baseline = result
        elif differing(baseline, result):
            mismatches.append(f"{label}: {', '.join(differing(baseline, result))}")
    compared = ", ".join(label for label, _, _ in runs[1:])
    if mismatches:
        return {"status": "fail", "detail": f"bits differ from the first configs' for {'; '.join(mismatches)}",
                "runs": [r[0] for r in runs]}
    return {"status": "pass", "detail": f"{len(runs)} runs bit-equal (CA_PAD {ca_pad}): {compared}",
            "runs": [r[0] for r in runs]}


# 2. batch sweep and the auto table ---------------------------------------------------------------

def _timed(context, runs: dict) -> dict:
    """Median ms of each run, timed round-robin (do_bench samples on a GPU)."""
    warmup, repeats = (0, 1) if context.dry_run else (1, 5)
    samples = measure.time_round_robin(runs, warmup=warmup, repeats=repeats, device=context.device)
    return {name: measure.summarize(s)["median_ms"] for name, s in samples.items()}


def untimed_first_call(context, runs: dict) -> None:
    """On a GPU, call each run once untimed: the first call compiles and autotunes."""
    if context.device == "cuda":
        for run in runs.values():
            run()


def _under(variant: str, run):
    """`run`, called inside configs.forced(variant) every time (forcing holds per call)."""
    def forced_run():
        with configs.forced(variant=variant):
            return run()

    return forced_run


def batch_sweep(context, dtype_name: str, mode: str, rows: list) -> dict:
    dtype = config.DTYPES[dtype_name]
    lines = []
    for batch in BATCHES[context.device]:
        shape = bench_shape(context, batch)
        runs = {p: micro_case(p, mode, shape, dtype, context.device).run for p in ("reference", "floor")}
        for variant in configs.VARIANTS:
            runs[variant] = _under(variant, micro_case("fused", mode, shape, dtype, context.device).run)
        untimed_first_call(context, runs)
        medians = _timed(context, runs)
        winner = min(configs.VARIANTS, key=medians.get)
        rows.append((dtype_name, mode, batch, *(medians[n] for n in ("reference", "floor", *configs.VARIANTS)),
                     winner, medians[winner] / medians["floor"]))
        lines.append(f"B{batch}: {winner} {medians[winner]:.3f} ms ({medians[winner] / medians['floor']:.2f}x floor)")
    return {"status": "measured", "detail": "; ".join(lines)}


def auto_table(context, rows: list, device_name: str) -> dict:
    """The variant `auto` should run here: the lowest geometric mean of time over the best
    variant's, across every measured (dtype, mode, B)."""
    if not rows:
        return {"status": "skipped", "detail": "no batch sweep was measured"}
    variants = configs.VARIANTS
    scores = {}
    for i, variant in enumerate(variants):
        ratios = [row[SWEEP_VARIANT_COLUMN + i] / min(row[SWEEP_VARIANT_COLUMN:SWEEP_VARIANT_COLUMN + len(variants)])
                  for row in rows]
        scores[variant] = math.exp(sum(map(math.log, ratios)) / len(ratios))
    winner = min(scores, key=scores.get)
    current = configs.auto_variant(device_name)
    context.document["findings"]["auto_variant"] = {device_name: winner}
    detail = (f"configs.AUTO_VARIANT[{device_name!r}] = {winner!r} (geometric mean over the best: "
              + ", ".join(f"{v} {s:.3f}" for v, s in scores.items()) + f"; auto runs {current!r} today)")
    return {"status": "measured", "detail": detail, "scores": scores, "proposed": {device_name: winner},
            "current": current}


# 3. ring footprint ------------------------------------------------------------------------------

@contextlib.contextmanager
def persistent_programs(count: int):
    """Launch the persistent kernels with `count` programs (which also sizes their scratch ring
    and enters the choice of T chunks). The launcher has no public hook for this, so its
    `_sm_programs` (programs of a config on a device) is replaced for the duration."""
    original = launcher._sm_programs
    launcher._sm_programs = lambda config, device: count
    try:
        yield
    finally:
        launcher._sm_programs = original


def ring_footprint(context, rows: list) -> dict:
    device = torch.device(context.device)
    shape = bench_shape(context, 8 if not context.dry_run else 2)
    default = max(launcher._sm_programs(c, device) for c in configs.configs_for("forward", shape.Ca))
    if context.dry_run:
        counts = sorted({1, default})
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        counts = sorted({sms // 2, sms, default, 2 * sms, 4 * sms})
    results = {}
    for mode in ("forward", "forward_backward"):
        fused = micro_case("fused", mode, shape, torch.bfloat16, context.device).run
        runs = {}
        for count in counts:
            def run(count=count, fused=fused):
                with persistent_programs(count):
                    return _under("fused", fused)()
            runs[count] = run
        untimed_first_call(context, runs)
        medians = _timed(context, runs)
        for count in counts:
            peak = measure.cuda_peak_bytes(runs[count])["cuda_peak_rise_bytes"] if context.device == "cuda" else None
            results.setdefault(count, {})[mode] = (medians[count], peak)
    for count in counts:
        rows.append((count, count == default, results[count]["forward"][0], results[count]["forward_backward"][0],
                     None if results[count]["forward"][1] is None else results[count]["forward"][1] / 2**20))
    best = min(counts, key=lambda c: results[c]["forward_backward"][0])
    return {"status": "measured", "detail": f"{len(counts)} program counts (default {default}); fastest forward + "
            f"backward at {best} programs", "default_programs": default}


# 4. kernels under the profiler ------------------------------------------------------------------

def _device_time_us(event) -> float:
    """An averaged profiler event's device time (the attribute's name moved between versions)."""
    for attribute in ("device_time_total", "cuda_time_total"):
        value = getattr(event, attribute, None)
        if value is not None:
            return float(value)
    return 0.0


def model_entries(kernel: str, entries: list) -> list:
    """The model_h100 entries of one profiled kernel: those named by its stem (the name without
    st_adapter_ and _kernel), or by its alias."""
    stem = kernel.removeprefix("st_adapter_").removesuffix("_kernel")
    for name, alias in MODEL_ALIASES.items():
        if name in stem:
            stem = alias
    return [e for e in entries if e[0].startswith(stem) or e[0].startswith(kernel)]


def profiled_kernels(context, variant: str, rows: list, bandwidth: float | None) -> dict:
    shape = bench_shape(context, 8 if not context.dry_run else 2)
    run = _under(variant, micro_case("fused", "forward_backward", shape, torch.bfloat16, context.device).run)
    for _ in range(PROFILER_WARMUP[context.device]):
        run()
    calls = PROFILED_CALLS[context.device]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if context.device == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(calls):
            run()
        if context.device == "cuda":
            torch.cuda.synchronize()
    kernels = [(e.key, e.count, _device_time_us(e)) for e in profiler.key_averages() if _device_time_us(e) > 0
               and getattr(e, "device_type", None) is not None and "cuda" in str(e.device_type).lower()]
    chains = model_h100.chains(shape.B, shape.T, shape.L, shape.C, shape.Ca, shape.kt, "bf16")
    entries = chains.get((variant, "forward + backward")) or []
    total_ms = 0.0
    for name, count, device_us in sorted(kernels, key=lambda k: -k[2]):
        per_call_ms = device_us / calls / 1e3
        total_ms += per_call_ms
        matched = model_entries(name, entries)
        # model_h100 rows: (name, HBM bytes read + written, L2 re-read bytes, FLOPs)
        model_bytes = sum(e[1] for e in matched) if matched else None
        rows.append((variant, name[:60], count / calls, per_call_ms,
                     None if model_bytes is None else model_bytes / 1e6,
                     sum(e[2] for e in matched) / 1e6 if matched else None,
                     None if model_bytes is None else model_bytes / (per_call_ms / 1e3) / 1e12,
                     None if model_bytes is None or not bandwidth else per_call_ms / 1e3 / (model_bytes / bandwidth),
                     ", ".join(e[0] for e in matched) or None))
    if not kernels:
        why = "no device kernels (the interpreter runs on the CPU)" if context.dry_run else "the profiler saw no kernels"
        return {"status": "measured", "detail": why}
    unmodelled = "" if entries else f"; tools/model_h100.py has no ({variant!r}, 'forward + backward') chain"
    return {"status": "measured", "detail": f"{len(kernels)} kernels, {total_ms:.3f} ms of device time per forward "
            f"+ backward{unmodelled}"}


# 5. int64 offsets --------------------------------------------------------------------------------

def int64_case(context, variant: str) -> dict:
    """x with more than 2^31 elements; only the last video gets a non-zero output gradient, so
    the output of that video, dx and every parameter gradient can be checked against the float64
    oracle on that video alone (the other videos' dx must be exactly zero)."""
    parity = harness()
    one = adapter_case(context, batch=1)
    per_video = one.frames * one.tokens * one.channels
    videos = 2 if context.dry_run else INT32_LIMIT // per_video + 2
    small, small_grad = _inputs(one, context.device, seed=3)
    case = one.with_(batch=videos)
    T = one.frames
    x = torch.randn((videos * T, one.tokens, one.channels), device=context.device, dtype=one.dtype)
    x[-T:] = small["x"]
    cond = torch.randn((videos, one.bottleneck), device=context.device, dtype=one.dtype)
    cond[-1:] = small["cond"]
    grad_out = torch.zeros_like(x)
    grad_out[-T:] = small_grad
    weights = {n: t.detach().clone().requires_grad_() for n, t in small.items() if n not in ("x", "cond")}
    x.requires_grad_()
    cond.requires_grad_()
    leaves = {"x": x, **weights, "cond": cond}
    with configs.forced(variant=variant):
        out = parity.call(sk.st_adapter, leaves, case, backend="triton")
        grads = dict(zip(leaves, torch.autograd.grad(out, list(leaves.values()), grad_out)))
    # Copies, not views: the big tensors are freed before the oracle runs.
    got = {"out": out[-T:].clone(), "d_x": grads["x"][-T:].clone(), "d_cond": grads["cond"][-1:].clone(),
           **{f"d_{n}": grads[n] for n in weights}}
    stray = float(grads["x"][:-T].abs().max())
    elements = x.numel()
    del out, grads, x, grad_out, cond, leaves
    reference = {n: t.detach().double().requires_grad_() for n, t in small.items()}
    expected_out = parity.call(oracle, reference, one)
    expected = dict(zip(reference, torch.autograd.grad(expected_out, list(reference.values()), small_grad.double())))
    errors = {"out": parity.rel_error(got["out"], expected_out),
              **{f"d_{n}": parity.rel_error(got[f"d_{n}"], expected[n]) for n in reference}}
    if context.device == "cuda":
        torch.cuda.empty_cache()
    tolerance = parity.TOLERANCE[one.dtype]
    failing = {n: e for n, e in errors.items() if not e <= tolerance}
    past = elements > INT32_LIMIT
    detail = (f"{elements:,} elements ({'past' if past else 'below'} 2^31{', dry run' if context.dry_run else ''}), "
              f"last video worst {max(errors, key=errors.get)} {max(errors.values()):.2e} <= {tolerance:g}, "
              f"other videos' dx max |.| {stray:g}")
    ok = not failing and stray == 0.0 and (past or context.dry_run)
    return {"status": "pass" if ok else "fail", "detail": detail if ok else f"{detail}; over tolerance: {failing}",
            "errors": errors, "elements": elements}


# 6. CUDA graphs -----------------------------------------------------------------------------------

def cuda_graph(context, variant: str, cold: bool) -> dict:
    """Capture one forward + backward in a CUDA graph, replay it, and compare its bits with an
    eager call. Cold: the shape's kernels were never launched in this process, so the capture
    meets their first launch (autotuning); warm: an eager call ran first."""
    if context.device != "cuda":
        return {"status": "unavailable", "detail": "CUDA graphs need a GPU (dry run)"}
    case = adapter_case(context, channels=COLD_WIDTHS[variant], bottleneck=128, activation="silu") if cold \
        else adapter_case(context)
    inputs, grad_out = _inputs(case, "cuda", seed=5)
    parity = harness()
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    with configs.forced(variant=variant):
        if not cold:
            forward_backward(case, inputs, grad_out)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                out = parity.call(sk.st_adapter, {n: leaves.get(n) for n in parity.INPUT_NAMES}, case, backend="triton")
                grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
        except Exception as error:  # a clear error is what issue 16 allows for a cold capture
            status = "measured" if cold else "fail"
            return {"status": status, "detail": f"capture raised {type(error).__name__}: {error}"[:1500]}
        graph.replay()
        torch.cuda.synchronize()
        replayed = {"out": out.detach().clone(), **{f"d_{n}": g.clone() for n, g in zip(leaves, grads)}}
        eager = forward_backward(case, inputs, grad_out)
    mismatched = differing(eager, replayed)
    if mismatched:
        return {"status": "fail", "detail": f"the replay differs from an eager call in {', '.join(mismatched)}"}
    return {"status": "pass", "detail": f"captured and replayed; bit-equal to an eager call (C {case.channels}, "
            f"Ca {case.bottleneck}, {case.activation})"}


# the step ------------------------------------------------------------------------------------------

def run(context) -> None:
    doc = context.document
    doc["findings"] = {}
    environment = environment_document(context.out_dir)
    device_name = environment.get("summary", {}).get("device_name") or (
        torch.cuda.get_device_name() if context.device == "cuda" else "cpu")
    bandwidth = (environment.get("peaks") or {}).get("bandwidth")
    variants = configs.VARIANTS
    sweep_rows, ring_rows, kernel_rows = [], [], []
    dtypes = ("bfloat16",) if context.dry_run else ("bfloat16", "float32")
    checks = [(f"bit-equality {v} {d}", bit_equality, (context, v, getattr(torch, d))) for d in dtypes for v in variants]
    checks += [(f"batch sweep {d} {m}", batch_sweep, (context, d, m, sweep_rows))
               for d in dtypes for m in ("forward", "forward_backward")]
    checks += [("auto table", auto_table, (context, sweep_rows, device_name)),
               ("ring footprint (fused)", ring_footprint, (context, ring_rows))]
    checks += [(f"kernels under the profiler {v}", profiled_kernels, (context, v, kernel_rows, bandwidth))
               for v in variants]
    checks += [(f"int64 offsets {v}", int64_case, (context, v)) for v in variants]
    checks += [(f"CUDA graph {'cold' if cold else 'warm'} {v}", cuda_graph, (context, v, cold))
               for cold in (False, True) for v in variants]
    for index, (name, check, args) in enumerate(checks):
        if context.time_left() <= 0:
            context.skip_rest([n for n, _, _ in checks[index:]], budget_exhausted(context))
            break
        guarded(context, name, check, *args)
        doc["tables"] = tables(variants, sweep_rows, ring_rows, kernel_rows)
        context.save()


def tables(variants, sweep_rows, ring_rows, kernel_rows) -> list[dict]:
    return [
        {"title": "batch sweep (T 8): median ms", "rows": sweep_rows,
         "columns": ("dtype", "mode", "B", "reference", "floor", *variants, "winner", "winner x floor")},
        {"title": "ring footprint (fused, B 8, bfloat16)", "rows": ring_rows,
         "columns": ("programs", "default", "forward ms", "forward + backward ms", "forward peak rise MiB")},
        {"title": "kernels of one forward + backward (B 8, bfloat16) against tools/model_h100.py", "rows": kernel_rows,
         "columns": ("variant", "kernel", "launches", "ms", "modelled HBM MB", "modelled L2 MB", "achieved HBM TB/s",
                     "x device floor", "model entries"),
         "note": "achieved HBM TB/s: modelled HBM bytes over the measured time; x device floor: the time over "
                 "modelled HBM bytes / step 0's measured copy bandwidth."},
    ]
