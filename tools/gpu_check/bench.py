"""Step 2: the benchmark's quick sweep on CUDA and its roofline, with measured distances.

The micro cases of `python -m benchmarks --quick` (ViT-B/16's adapter, T 8 and 16, float32 and
bfloat16, forward and forward + backward), every provider timed round-robin with do_bench by
the benchmark's own `runner.run_case`. The T = 8 cases run first, so a cut-off run still has
them. Two changes to the sweep keep it inside the time box, both recorded in the document:
`compile` uses torch.compile's default mode (max-autotune costs minutes per case), and the
model modes are left out (a ViT per case, and timm, which the lent machine may lack).

Each case's distance from the roofline is given twice: against the benchmark's modelled H100
(`measured_over_modelled`, as `make bench` reports it) and against this device's own peaks
measured in step 0 (`measured_over_device_floor`).
"""

from __future__ import annotations

import torch

from benchmarks import config, runner
from benchmarks.providers import Shape
from benchmarks.roofline import roofline

from .results import budget_exhausted, environment_document

#: The dry run's one tiny shape (the interpreter is numpy underneath).
DRY_RUN_SHAPE = dict(B=1, T=2, L=10, C=32, Ca=16)
COMPILE_MODE = "default"
#: The quick sweep's modes that run here.
MODES = ("forward", "forward_backward")
#: Providers whose failure is a failure of the check's subject (fused) or of the check itself.
REQUIRED = ("official", "reference", "floor")


def planned_cases(device: str) -> list[tuple[str, object, str]]:
    if device == "cpu":
        shape = Shape(**DRY_RUN_SHAPE)
        return [(mode, shape, "bfloat16") for mode in MODES]
    _, cases = runner.plan(runner.build_parser().parse_args(["--quick", "--modes", *MODES]), device)
    # bfloat16 before float32 and T = 8 before T = 16: the most telling cases first.
    return sorted(cases, key=lambda case: (case[1].T, case[2] != "bfloat16", case[0]))


def device_machine(out_dir: str):
    """This device as a benchmarks.config.Roofline, from step 0's measured peaks (None without them)."""
    environment = environment_document(out_dir)
    peaks = environment.get("peaks")
    if not peaks:
        return None
    return config.Roofline(name=f"{environment['summary']['device_name']} (measured peaks)",
                           bandwidth=peaks["bandwidth"], flops=peaks["flops"])


def case_item(records: list[dict], device: str) -> dict:
    by_provider = {r["provider"]: r for r in records}
    label = f"{records[0]['mode']} B{records[0]['shape']['B']} T{records[0]['shape']['T']} {records[0]['dtype']}"
    fused = by_provider.get("fused")
    broken = [f"{p}: {by_provider[p]['status']} ({by_provider[p]['reason']})" for p in REQUIRED
              if by_provider[p]["status"] != "ok"]
    if fused is None or fused["status"] != "ok":
        status, detail = "fail", f"fused did not run: {fused and fused['reason']}"
    elif broken:
        status, detail = "error", "; ".join(broken)
    else:
        status = "measured"
        detail = (f"fused {fused['time']['median_ms']:.3f} ms, x floor {fused['ratio_to_floor']:.2f}, "
                  f"official/fused {by_provider['official']['ratio_to_fused']:.2f}")
        if fused.get("roofline_device"):
            detail += f", {fused['roofline_device']['measured_over_device_floor']:.1f}x this device's floor"
    return {"name": label, "status": status, "detail": detail}


def roofline_rows(records: list[dict]) -> list[tuple]:
    rows = []
    for r in records:
        if r["status"] != "ok":
            rows.append((r["mode"], r["shape"]["B"], r["shape"]["T"], r["dtype"], r["provider"], r["status"],
                         None, None, None, None, r["reason"]))
            continue
        device_roof = r.get("roofline_device") or {}
        rows.append((r["mode"], r["shape"]["B"], r["shape"]["T"], r["dtype"], r["provider"],
                     round(r["time"]["median_ms"], 4), r["ratio_to_fused"], r["ratio_to_floor"],
                     r["roofline"]["measured_over_modelled"], device_roof.get("measured_over_device_floor"),
                     r["backend"]))
    return rows


def run(context) -> None:
    device = context.device
    doc = context.document
    doc["changes_to_the_quick_sweep"] = [f"compile mode {COMPILE_MODE!r} (the sweep's {config.COMPILE_MODE!r} "
                                         "would cost minutes per case)", "model modes left out"]
    config.COMPILE_MODE = COMPILE_MODE  # read by benchmarks.providers.compiled when it builds a case
    # As runner.run does: every case compiles the same function anew, which would otherwise hit
    # dynamo's recompile limit and silently run eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    skips = {}
    if context.dry_run:
        skips = {("compile", mode): "skipped in the dry run: compiling costs more than the dry run" for mode in MODES}
        warmup, repeats = 0, 1
    else:
        quick = config.REPEATS["quick"]
        warmup, repeats = quick.warmup, quick.repeats
    machine = device_machine(context.out_dir)
    doc["device_machine"] = machine and {"name": machine.name, "bandwidth": machine.bandwidth, "flops": machine.flops}
    env = runner.environment(device, "gpu-check dry run" if context.dry_run else "gpu-check quick")
    cases = planned_cases(device)
    doc["records"] = []
    for index, (mode, shape, dtype_name) in enumerate(cases):
        if context.time_left() <= 0:
            context.skip_rest([f"{m} B{s.B} T{s.T} {d}" for m, s, d in cases[index:]], budget_exhausted(context))
            break
        records = runner.run_case(env, mode, shape, dtype_name, config.PROVIDERS, repeats, warmup, device, skips,
                                  tick=lambda: None)
        if machine is not None:
            floor = roofline(shape, mode, dtype_name, machine)
            for record in records:
                if record["time"]:
                    record["roofline_device"] = {**floor, "measured_over_device_floor":
                                                 record["time"]["median_ms"] / floor["modelled_ms"]}
        doc["records"] += records
        context.add(case_item(records, device))
    doc["tables"] = [{
        "title": "quick sweep: median time, ratios and distance from the roofline",
        "columns": ("mode", "B", "T", "dtype", "provider", "median ms", "x fused", "x floor",
                    "x modelled H100", "x this device's floor", "backend / reason"),
        "rows": roofline_rows(doc["records"]),
        "note": "x modelled H100: median over benchmarks.roofline's H100 model; x this device's floor: median over "
                "max(FLOPs / measured GEMM peak, minimal bytes / measured copy bandwidth) (step 0's peaks)."}]
    fused = [r for r in doc["records"] if r["provider"] == "fused" and r["status"] == "ok"]
    doc["findings"] = {"fused_x_floor": {f"{r['mode']} T{r['shape']['T']} {r['dtype']}": round(r["ratio_to_floor"], 3)
                                         for r in fused}}
    context.save()
