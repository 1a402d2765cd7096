"""The benchmark runner: plan the sweep, time every provider round-robin, measure memory, report.

    python -m benchmarks --quick          # the default of `make bench`
    python -m benchmarks --full           # the whole sweep of config.FULL
    python -m benchmarks --T 16 --ca 128 --dtype bfloat16 --modes forward

`run(argv)` does the work in-process and returns the JSON document; `main` is the console entry.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

import torch

from . import config, measure, report
from .host import cpu_info
from .model import model_case, model_shape
from .providers import Shape, Unavailable, micro_case
from .roofline import roofline

RESULTS_DIR = "bench-results"
#: Under --quick, compiling the model would take longer than the rest of the run on a CPU.
QUICK_SKIPS = {("compile", mode): "skipped under --quick: compiling the model costs more than the quick run"
               for mode in config.MODEL_MODES}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stadapter bench",
        description=("Benchmark the ST-Adapter providers (official, reference, compile, fused, floor) on one "
                     "adapter (forward, forward+backward) and in a ViT with an adapter per block (training "
                     "step, inference). Prints a table and a modelled H100 roofline; writes JSON, appends "
                     "CSV rows and draws PNG plots."),
        epilog=("With no sweep options the quick subset runs. Filters (--T, --ca, --dtype, --width) restrict "
                "the full sweep, or the quick one with --quick. Output schema: benchmarks/README.md."),
    )
    sweep = parser.add_argument_group("sweep")
    size = sweep.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small subset, under 3 minutes on a 2-core CPU")
    size.add_argument("--full", action="store_true", help="the whole sweep of benchmarks/config.py")
    sweep.add_argument("--T", type=int, nargs="+", help="frames per clip (full sweep: 8 16 32)")
    sweep.add_argument("--ca", type=int, nargs="+", help="bottleneck widths Ca (full sweep: 64 128 384)")
    sweep.add_argument("--width", nargs="+", choices=list(config.WIDTHS),
                       help=", ".join(f"{k}: C={v}" for k, v in config.WIDTHS.items()))
    sweep.add_argument("--dtype", nargs="+", choices=list(config.DTYPES), help="dtypes")
    sweep.add_argument("--modes", nargs="+", choices=config.MODES, default=list(config.MODES), metavar="MODE",
                       help=f"modes, of {', '.join(config.MODES)} (default: all)")
    sweep.add_argument("--providers", nargs="+", choices=config.PROVIDERS, default=list(config.PROVIDERS),
                       metavar="PROVIDER", help=f"providers, of {', '.join(config.PROVIDERS)} (default: all)")
    sweep.add_argument("--frames-per-batch", type=int, metavar="N",
                       help="B*T of the micro modes, B = max(1, this // T) (default: 16 on CPU, 128 on CUDA)")
    sweep.add_argument("--model-depth", type=int, metavar="N", help="blocks of the model modes (default: config.MODEL)")
    sweep.add_argument("--model-clips", type=int, metavar="N",
                       help="clips per batch in the model modes (default: config.MODEL)")
    sweep.add_argument("--model-frames", type=int, metavar="N", help="frames per clip in the model modes (default: 8)")
    timing = parser.add_argument_group("timing")
    timing.add_argument("--repeats", type=int, metavar="N",
                        help="timed round-robin rounds, every mode (default: 10 quick / 30 full, model modes 5 / 10)")
    timing.add_argument("--warmup", type=int, metavar="N",
                        help="untimed rounds first, every mode (default: 1 quick / 3 full, model modes 0 / 2)")
    timing.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default) = CUDA if present, else CPU")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="PATH", help=f"JSON document (default: {RESULTS_DIR}/bench-DEVICE.json)")
    output.add_argument("--csv", metavar="PATH", default=os.path.join(RESULTS_DIR, "bench.csv"),
                        help="CSV file rows are appended to (default: %(default)s)")
    output.add_argument("--plot-dir", metavar="DIR", default=RESULTS_DIR,
                        help="where bench-DEVICE-time.png and bench-DEVICE-memory.png go (default: %(default)s)")
    output.add_argument("--markdown", metavar="PATH", help="also write the results as a markdown table")
    output.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    output.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser


def _device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return requested


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_info().name} ({torch.get_num_threads()} threads)"


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(device: str, sweep_name: str) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "sweep": sweep_name, "device": device, "device_name": _device_name(device),
            "threads": torch.get_num_threads(), "torch_version": torch.__version__, "triton_version": triton_version,
            "python_version": platform.python_version(),
            "tf32": bool(torch.backends.cuda.matmul.allow_tf32)}


def plan(args, device: str) -> tuple[str, list[tuple[str, object, str]]]:
    """The sweep's name and its cases: (mode, Shape or ModelConfig, dtype name)."""
    filters = {k: getattr(args, k) for k in ("T", "ca", "width", "dtype") if getattr(args, k)}
    quick = args.quick or not (args.full or filters)
    name = "quick" if quick else ("full" if args.full and not filters else "custom")
    base = (config.QUICK if quick else config.FULL)[device]
    sweep = config.Sweep(**{**base.__dict__, **{k: tuple(v) for k, v in filters.items()}})
    frames = args.frames_per_batch or config.FRAMES_PER_BATCH[device]
    cases = []
    for mode in config.MICRO_MODES:
        if mode in args.modes:
            cases += [(mode, Shape(B=max(1, frames // t), T=t, L=config.TOKENS, C=config.WIDTHS[w], Ca=ca), d)
                      for d in sweep.dtype for w in sweep.width for ca in sweep.ca for t in sweep.T]
    model = config.MODEL[(device, "quick" if quick else "full")]
    model = config.ModelConfig(depth=args.model_depth or model.depth, clips=args.model_clips or model.clips,
                               frames=args.model_frames or model.frames)
    for mode in config.MODEL_MODES:
        if mode in args.modes:
            cases += [(mode, model, d) for d in sweep.dtype]
    return name, cases


def _record(env, provider, mode, shape, dtype_name) -> dict:
    return {**env, "provider": provider, "mode": mode, "dtype": dtype_name,
            "shape": {"B": shape.B, "T": shape.T, "L": shape.L, "C": shape.C, "Ca": shape.Ca, "kt": shape.kt,
                      "prefix": shape.prefix},
            "status": "ok", "reason": None, "backend": None, "notes": [], "time": None,
            "ratio_to_fused": None, "ratio_to_floor": None, "tokens_per_s": None, "memory": None, "roofline": None,
            "rel_err_vs_reference": None}


def run_case(env, mode, what, dtype_name, providers, repeats, warmup, device, skips, tick) -> list[dict]:
    """All providers of one case, timed together; returns one record per provider."""
    dtype = config.DTYPES[dtype_name]
    micro = mode in config.MICRO_MODES
    shape = what if micro else model_shape(what)
    records, cases, outputs = {}, {}, {}
    for provider in providers:
        record = records[provider] = _record(env, provider, mode, shape, dtype_name)
        if (provider, mode) in skips:
            record.update(status="skipped", reason=skips[(provider, mode)])
            continue
        try:
            case = (micro_case if micro else model_case)(provider, mode, what, dtype, device)
            # The first call, untimed, compiles (compile) and proves the provider runs at all: a
            # provider that fails is reported and the others are still timed.
            start = time.perf_counter()
            outputs[provider] = case.run()
            measure.synchronize(device)
            if provider == "compile":
                case.notes.append(f"first call (compilation) {time.perf_counter() - start:.1f} s, untimed")
        except Unavailable as why:
            record.update(status="unavailable", reason=str(why))
            continue
        except Exception as error:  # report and go on: one broken provider must not hide the rest
            record.update(status="error", reason=f"{type(error).__name__}: {error}")
            print(f"error: {provider} {mode} {shape.label()} {dtype_name}: {record['reason']}", file=sys.stderr)
            continue
        record.update(backend=case.backend, notes=case.notes)
        cases[provider] = case
    if mode == "forward" and "reference" in cases:
        expected = outputs["reference"].double()
        for provider in cases.keys() - {"floor"}:
            records[provider]["rel_err_vs_reference"] = float(
                (outputs[provider].double() - expected).norm() / expected.norm())
    outputs.clear()
    samples = measure.time_round_robin({p: c.run for p, c in cases.items()}, warmup=warmup, repeats=repeats,
                                       device=device, tick=tick)
    for provider, case in cases.items():
        record = records[provider]
        record["time"] = measure.summarize(samples[provider])
        record["tokens_per_s"] = shape.tokens / (record["time"]["median_ms"] / 1e3)
        memory = {"saved_bytes": None, "saved_activation_bytes": None, "cuda_max_memory_allocated": None,
                  "cuda_peak_rise_bytes": None}
        if case.saved is not None:
            memory.update(measure.saved_bytes(case.saved, case.existing))
        if device == "cuda":
            memory.update(measure.cuda_peak_bytes(case.run))
        memory["peak_rss_bytes"] = measure.peak_rss_bytes()
        record["memory"] = memory
    _ratios(records.values())
    if micro:
        roof = roofline(shape, mode, dtype_name)
        for record in records.values():
            measured_ms = record["time"]["median_ms"] if record["time"] else None
            record["roofline"] = {**roof, "measured_on_gpu": device == "cuda",
                                  "measured_over_modelled": None if measured_ms is None or device != "cuda"
                                  else measured_ms / roof["modelled_ms"]}
    return list(records.values())


def _ratios(records) -> None:
    medians = {r["provider"]: r["time"]["median_ms"] for r in records if r["time"]}
    for record in records:
        if record["time"]:
            own = record["time"]["median_ms"]
            record["ratio_to_fused"] = own / medians["fused"] if "fused" in medians else None
            record["ratio_to_floor"] = own / medians["floor"] if "floor" in medians else None


def run(argv=None) -> dict:
    """Run the benchmark described by `argv`; print the tables, write the files, return the document."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    device = _device(args.device)
    sweep_name, cases = plan(args, device)
    defaults = config.REPEATS["quick" if sweep_name == "quick" else "full"]

    def rounds(mode):
        """(warmup, repeats) of a mode: the options if given, else the sweep's defaults."""
        model = mode in config.MODEL_MODES
        warmup = defaults.model_warmup if model else defaults.warmup
        return (warmup if args.warmup is None else args.warmup,
                args.repeats or (defaults.model_repeats if model else defaults.repeats))

    skips = QUICK_SKIPS if sweep_name == "quick" else {}
    env = environment(device, sweep_name)
    # Inductor's autotuning logs go to stdout and would interleave with the table.
    torch._inductor.config.autotune_num_choices_displayed = 0
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    print(f"stadapter bench: {sweep_name} sweep on {env['device_name']}, torch {env['torch_version']}, "
          f"triton {env['triton_version']}, {len(cases)} cases x {len(args.providers)} providers, "
          f"{rounds('forward')[1]} timed rounds per case ({rounds('model_train')[1]} in model modes)", flush=True)
    from tqdm import tqdm

    bar = tqdm(total=sum(rounds(mode)[1] for mode, _, _ in cases), file=sys.stderr, disable=args.no_progress,
               unit="round")
    records = []
    for mode, what, dtype_name in cases:
        bar.set_description(f"{mode} {dtype_name}")
        warmup, repeats = rounds(mode)
        records += run_case(env, mode, what, dtype_name, args.providers, repeats, warmup, device, skips,
                            tick=lambda: bar.update(1))
    bar.close()

    model_cfg = next((what for mode, what, _ in cases if mode in config.MODEL_MODES), None)
    if model_cfg is not None:
        print(f"model modes: ViT-{model_cfg.width[-1].upper()}/16-shaped timm backbone (random weights, frozen), "
              f"{model_cfg.depth} blocks with a pre-MLP adapter (Ca={model_cfg.bottleneck}) each, "
              f"{model_cfg.clips} clip(s) x {model_cfg.frames} frames; batch sized to the {device}")
    print(report.results_table(records))
    print("\nRoofline (micro modes; modelled H100: 3.0 TB/s, 790 TFLOP/s bf16/fp16, 495 TF32, 67 fp32)")
    print(report.roofline_table(records))

    document = {"schema_version": 1, "environment": env, "records": records}
    json_path = args.json or os.path.join(RESULTS_DIR, f"bench-{device}.json")
    report.write_json(json_path, document)
    report.append_csv(args.csv, records)
    written = [json_path, args.csv]
    if args.markdown:
        report.write_text(args.markdown, report.markdown_table(records))
        written.append(args.markdown)
    if not args.no_plot:
        for kind, draw in (("time", report.plot_time), ("memory", report.plot_memory)):
            path = os.path.join(args.plot_dir, f"bench-{device}-{kind}.png")
            draw(path, records, env["device_name"])
            written.append(path)
    print(f"\nwrote {', '.join(written)} in {time.perf_counter() - started:.0f} s")
    return document


def main(argv=None) -> int:
    run(argv)
    return 0
