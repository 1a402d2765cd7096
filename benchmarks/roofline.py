"""FLOPs, minimal bytes and the modelled H100 time of one adapter call.

Minimal bytes count each tensor moved once at its dtype: the forward reads x and writes the
output; forward + backward also reads x and the output gradient again and writes dx, and reads
the weights / writes their gradients. The modelled time is max(FLOPs / peak, bytes / bandwidth)
on `config.H100`, whatever device measured the providers.
"""

from __future__ import annotations

import torch

from . import config


def peak_key(dtype_name: str) -> str:
    """float32 GEMMs run on TF32 tensor cores when torch allows it."""
    if dtype_name == "float32" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return dtype_name


def roofline(shape, mode: str, dtype_name: str, machine: config.Roofline = config.H100) -> dict:
    """FLOPs, minimal bytes, arithmetic intensity and the modelled time (ms) and bound."""
    element = torch.empty((), dtype=config.DTYPES[dtype_name]).element_size()
    n, c, ca, kt = shape.rows, shape.C, shape.Ca, shape.kt
    gemm = 2 * n * c * ca
    conv = 2 * n * ca * kt
    x_bytes = shape.tokens * c * element
    weight_bytes = (2 * c * ca + ca * kt + 2 * ca + c) * element
    if mode == "forward":
        flops, nbytes = 2 * gemm + conv + n * c, 2 * x_bytes + weight_bytes
    else:  # forward + backward: 6 GEMMs, the conv and its two gradients, two residual adds
        flops, nbytes = 6 * gemm + 3 * conv + 2 * n * c, 5 * x_bytes + 2 * weight_bytes
    key = peak_key(dtype_name)
    compute_s, memory_s = flops / machine.flops[key], nbytes / machine.bandwidth
    return {"machine": machine.name, "flops": flops, "min_bytes": nbytes, "intensity": flops / nbytes,
            "peak": key, "modelled_ms": max(compute_s, memory_s) * 1e3,
            "bound": "compute" if compute_s >= memory_s else "memory"}
