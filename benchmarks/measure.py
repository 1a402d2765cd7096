"""Timing (round-robin over providers) and memory accounting (saved tensors, peak RSS, CUDA peak).

Providers of one case are interleaved round by round, in a rotating order, so drift in the
machine's speed (other processes on a shared CPU, GPU clocks) spreads over all of them instead
of biasing whichever ran last. On CUDA every sample is a triton.testing.do_bench measurement
(CUDA events, L2 flushed between calls); on CPU it is one call timed with perf_counter.
"""

from __future__ import annotations

import resource
import time
from typing import Callable, Iterable

import numpy as np
import torch


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_round_robin(runs: dict[str, Callable[[], object]], *, warmup: int, repeats: int, device: str,
                     tick: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds per call of each run, `repeats` rounds after `warmup` untimed rounds."""
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    synchronize(device)
    samples = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].extend(_sample(runs[name], device))
        tick()
    return samples


def _sample(run: Callable[[], object], device: str) -> list[float]:
    if device == "cuda":
        import triton.testing

        # A short do_bench per round (ms in, ms out); its own warmup keeps clocks up.
        return [ms / 1e3 for ms in triton.testing.do_bench(run, warmup=5, rep=25, return_mode="all")]
    start = time.perf_counter()
    run()
    return [time.perf_counter() - start]


def summarize(seconds: list[float]) -> dict:
    """Median, p20 and p80 in milliseconds, and the sample count."""
    ms = np.asarray(seconds) * 1e3
    return {"median_ms": float(np.median(ms)), "p20_ms": float(np.percentile(ms, 20)),
            "p80_ms": float(np.percentile(ms, 80)), "samples": int(ms.size)}


def saved_bytes(forward: Callable[[], object], existing: Iterable[torch.Tensor]) -> dict:
    """Bytes autograd saves for backward in one forward, each storage counted once.

    `saved_bytes` counts every saved storage; `saved_activation_bytes` leaves out the storages of
    `existing` (inputs and parameters, alive anyway), so it is the memory the forward adds.
    """
    existing_ptrs = {t.untyped_storage().data_ptr() for t in existing if t is not None}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return {"saved_bytes": sum(seen.values()),
            "saved_activation_bytes": sum(n for ptr, n in seen.items() if ptr not in existing_ptrs)}


def peak_rss_bytes() -> int:
    """The process's peak resident set size so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cuda_peak_bytes(run: Callable[[], object]) -> dict:
    """torch.cuda.max_memory_allocated over one call, and its rise above what was allocated before
    (the other providers' inputs of the same case are alive too, so the rise is this call's own)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"cuda_max_memory_allocated": peak, "cuda_peak_rise_bytes": peak - before}
