"""Step 0: what the check runs on (device, driver, torch and triton versions, the source it
checks) and this device's measured peaks (HBM copy bandwidth, dense GEMM FLOP/s per dtype),
which the bench and GPU-only steps use for rooflines of this device rather than the H100 model.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

import numpy
import torch
import triton

from benchmarks import measure

from .results import guarded

REPO = Path(__file__).resolve().parents[2]
#: (torch, triton) major.minor pairs this check is written for: the project's pins (setup.py,
#: and the triton that torch pins) and what the lent machine's python3 had when last seen.
KNOWN_STACKS = {((2, 14), (3, 8)): "the project's pins", ((2, 11), (3, 6)): "the lent machine's own python3"}
#: The oldest torch and triton the check supports (the lent machine's).
OLDEST = {"torch": (2, 11), "triton": (3, 6)}
#: Sizes of the peak measurements: (copy bytes, square GEMM size) on a GPU and in a dry run.
PEAK_SIZES = {"cuda": (1 << 30, 8192), "cpu": (1 << 24, 256)}


def major_minor(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def source_fingerprint() -> dict:
    """Which code ran: the git commit when there is a repository, and a hash of the sources
    (the lent machine gets a copy of the working tree, perhaps without .git)."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "stadapter_kernels").rglob("*.py")) + sorted((REPO / "tools").rglob("*.py")):
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty, "sources_sha256": digest.hexdigest()[:16]}


def nvidia_smi() -> dict:
    fields = ("name", "driver_version", "clocks.max.sm", "clocks.max.memory", "power.limit", "memory.total")
    try:
        output = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError) as error:
        return {"error": f"nvidia-smi: {error}"}
    return dict(zip(fields, (v.strip() for v in output.splitlines()[0].split(","))))


def versions() -> dict:
    found = {"torch": major_minor(torch.__version__), "triton": major_minor(triton.__version__)}
    too_old = [f"{name} {'.'.join(map(str, v))} < {'.'.join(map(str, OLDEST[name]))}"
               for name, v in found.items() if v < OLDEST[name]]
    return {"torch": torch.__version__, "triton": triton.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "cuda_runtime": torch.version.cuda,
            "stack": KNOWN_STACKS.get((found["torch"], found["triton"]), "untested (neither the pins nor the lent machine's)"),
            "too_old": too_old, "float32_matmul_precision": torch.get_float32_matmul_precision()}


def device_info(device: str) -> dict:
    if device != "cuda":
        return {"device_name": f"{platform.processor() or platform.machine()} CPU ({torch.get_num_threads()} threads)",
                "driver": None, "sms": None, "capability": None}
    props = torch.cuda.get_device_properties(0)
    smi = nvidia_smi()
    driver = smi.get("driver_version")
    if driver is None:  # no nvidia-smi: the CUDA driver API version, e.g. 12080 -> 12.8
        api = torch._C._cuda_getDriverVersion()
        driver = f"CUDA driver API {api // 1000}.{api % 1000 // 10}"
    return {"device_name": props.name, "driver": driver, "sms": props.multi_processor_count,
            "capability": f"sm_{props.major}{props.minor}", "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None), "device_count": torch.cuda.device_count(),
            "nvidia_smi": smi}


def _median_s(fn, device: str) -> float:
    samples = measure.time_round_robin({"run": fn}, warmup=1, repeats=3, device=device)["run"]
    return measure.summarize(samples)["median_ms"] / 1e3


def measure_peaks(device: str) -> dict:
    """HBM bandwidth of a large copy (bytes read + written / s) and dense GEMM FLOP/s, keyed as
    benchmarks.config.H100's peaks so benchmarks.roofline can use them as a machine."""
    copy_bytes, n = PEAK_SIZES[device]
    source = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    target = torch.empty_like(source)
    bandwidth = 2 * copy_bytes / _median_s(lambda: target.copy_(source), device)
    del source, target
    flops = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for key, dtype, tf32 in (("bfloat16", torch.bfloat16, False), ("float16", torch.float16, False),
                                 ("tf32", torch.float32, True), ("float32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            flops[key] = 2 * n**3 / _median_s(lambda: torch.mm(a, b), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return {"bandwidth": bandwidth, "flops": flops, "copy_bytes": copy_bytes, "gemm_size": n}


def run(context) -> None:
    doc = context.document
    doc["versions"] = versions()
    doc["device"] = device_info(context.device)
    doc["source"] = source_fingerprint()
    v, d = doc["versions"], doc["device"]
    doc["summary"] = {"device_name": d["device_name"], "driver": d["driver"], "cuda_runtime": v["cuda_runtime"],
                      "torch": v["torch"], "triton": v["triton"], "python": v["python"], "stack": v["stack"],
                      "sms": d["sms"], "capability": d["capability"],
                      "source": f"{doc['source']['git_commit'] or 'no git'} sources {doc['source']['sources_sha256']}"}
    context.add({"name": "versions", "status": "fail" if v["too_old"] else "pass",
                 "detail": f"torch {v['torch']}, triton {v['triton']}: {v['stack']}"
                           + (f"; too old: {', '.join(v['too_old'])}" if v["too_old"] else "")})

    def peaks():
        doc["peaks"] = measure_peaks(context.device)
        p = doc["peaks"]
        return {"status": "measured", "detail": f"copy {p['bandwidth'] / 1e12:.2f} TB/s; GEMM TFLOP/s "
                + ", ".join(f"{k} {f / 1e12:.1f}" for k, f in p["flops"].items())}

    guarded(context, "measured peaks", peaks)
