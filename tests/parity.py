"""Parity harness: random adapter inputs, the float64 oracle, DESIGN.md's tolerances.

Every backend's parity tests go through `assert_matches_oracle`: it runs the op with
NaN-poisoned allocations (torch's deterministic mode fills every torch.empty with NaN, so an
element a kernel forgot to write fails), compares the output and every gradient with the
float64 oracle computed from the same rounded inputs, and never accepts a NaN.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch

import stadapter_kernels as sk
from stadapter_kernels.reference import oracle

#: Relative Frobenius error allowed against the float64 oracle (DESIGN.md).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
INPUT_NAMES = ("x", "fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias", "cond")


@dataclass(frozen=True)
class Case:
    """One adapter call: sizes, options and which optional inputs are present."""

    batch: int = 2
    frames: int = 3
    tokens: int = 11
    channels: int = 40
    bottleneck: int = 24
    kernel_t: int = 3
    prefix: int = 1
    layout: str = "nlc"
    activation: str = "gelu"
    scale: float = 0.5
    biases: bool = True
    cond: bool = False
    residual: bool = True
    kernel_hw: int = 1
    dtype: torch.dtype = torch.float32

    def with_(self, **changes) -> "Case":
        return replace(self, **changes)


def make_inputs(case: Case, device="cpu", seed: int | None = None) -> dict[str, torch.Tensor | None]:
    """Random inputs with O(1) activations; the conv and biases are non-zero so every term matters."""
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    B, T, L, C, Ca, kt = case.batch, case.frames, case.tokens, case.channels, case.bottleneck, case.kernel_t

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).to(case.dtype).to(device)

    x = randn(B, T, L, C)
    if case.layout == "nlc":
        x = x.flatten(0, 1)
    elif case.layout == "lnc":
        # A real sequence-first tensor (L, B*T, C), not a view of a batch-first one.
        x = x.permute(2, 0, 1, 3).flatten(1, 2).contiguous()
    k = case.kernel_hw
    inputs = {
        "x": x,
        "fc1_weight": randn(Ca, C, std=1 / math.sqrt(C)),
        "fc1_bias": randn(Ca, std=0.1) if case.biases else None,
        "conv_weight": randn(Ca, 1, kt, k, k, std=1 / math.sqrt(kt * k * k)),
        "conv_bias": randn(Ca, std=0.1) if case.biases else None,
        "fc2_weight": randn(C, Ca, std=1 / math.sqrt(Ca)),
        "fc2_bias": randn(C, std=0.1) if case.biases else None,
        "cond": randn(B, Ca, std=0.5) if case.cond else None,
    }
    return inputs


def op_kwargs(case: Case) -> dict:
    return dict(num_frames=case.frames, prefix=case.prefix, activation=case.activation, scale=case.scale,
                residual=case.residual, layout=case.layout)


def call(fn, inputs: dict, case: Case, **extra):
    positional = [inputs[name] for name in INPUT_NAMES[:7]]
    return fn(*positional, cond=inputs["cond"], **op_kwargs(case), **extra)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64; NaN anywhere gives inf."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(actual).all():
        return math.inf
    denominator = expected.norm().item()
    difference = (actual - expected).norm().item()
    return difference / denominator if denominator > 0 else difference


@contextlib.contextmanager
def poisoned_allocations():
    """Make every uninitialised allocation NaN for the duration (torch's deterministic fill)."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.utils.deterministic.fill_uninitialized_memory = previous[1]


def assert_matches_oracle(case: Case, backend: str, device="cpu", tolerance: float | None = None) -> dict:
    """Output and every gradient of `st_adapter(backend=...)` against the float64 oracle.

    Returns the relative errors by name, for tests that want to report them.
    """
    tolerance = TOLERANCE[case.dtype] if tolerance is None else tolerance
    inputs = make_inputs(case, device)
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    present = {n: leaves.get(n) for n in INPUT_NAMES}
    x_before = inputs["x"].clone()
    with poisoned_allocations():
        out = call(sk.st_adapter, present, case, backend=backend)
        grad_out = torch.randn(out.shape, dtype=torch.float64).to(case.dtype).to(device)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    assert torch.equal(inputs["x"], x_before), "the op modified the caller's x"

    reference_leaves = {n: t.detach().double().requires_grad_() for n, t in inputs.items() if t is not None}
    expected = call(oracle, {n: reference_leaves.get(n) for n in INPUT_NAMES}, case)
    expected_grads = torch.autograd.grad(expected, list(reference_leaves.values()), grad_out.double())

    errors = {"out": rel_error(out, expected)}
    errors.update({f"d_{name}": rel_error(g, e) for name, g, e in zip(leaves, grads, expected_grads)})
    assert out.shape == inputs["x"].shape and out.dtype == case.dtype
    failing = {name: err for name, err in errors.items() if not err <= tolerance}
    assert not failing, f"{case} backend={backend}: errors over {tolerance:g}: {failing} (all: {errors})"
    return errors


def with_cpp_gemm_paths(cases) -> list:
    """(case, patch rows per tile) -> (case, tile, native_gemm): bfloat16/float16 cases run both ways
    the cpp backend runs their GEMMs (widened to float32, and in the 16-bit dtype), float32 its one."""
    return [(case, tile, native) for case, tile in cases
            for native in ((False,) if case.dtype == torch.float32 else (False, True))]


def force_cpp_path(monkeypatch, dtype: torch.dtype, tile: int, native_gemm: bool) -> None:
    """Make the cpp backend use this tiling (0: its own) and GEMM path for `dtype` in one test."""
    from stadapter_kernels import fused_cpp
    monkeypatch.setattr(fused_cpp, "tile_patches", tile)
    monkeypatch.setitem(fused_cpp.native_gemm, dtype, native_gemm)
