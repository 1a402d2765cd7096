"""Backend registry, `backend="auto"` resolution and `explain`.

A backend is a module with three functions (the contract every fused implementation follows),
and optionally `describe(spec) -> str | None`, a note on how it will run this call that
`explain` shows:

    unavailable_reason(spec: AdapterSpec) -> str | None
        None when it can serve this call, else one sentence saying why not.
    forward(out, x, params: AdapterTensors, options: AdapterOptions) -> None
        writes the adapter output into `out`; `out` and `x` are strided (B, T, L, C) views,
        channel stride 1.
    backward(dx, grad_out, x, params, options) -> AdapterTensors
        writes dL/dx into `dx` and returns every parameter gradient (also for absent biases and
        cond, which the caller drops), recomputing the bottleneck from x.

`BACKEND_PREFERENCE` is the order in which `auto` tries them: fastest first.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType

from .spec import AdapterSpec

BACKEND_PREFERENCE = ("triton", "cpp", "reference")
_BACKEND_MODULES = {
    "triton": "stadapter_kernels.fused_triton",
    "cpp": "stadapter_kernels.fused_cpp",
    "reference": "stadapter_kernels.reference",
}


class BackendUnavailableError(RuntimeError):
    """A backend was forced (backend="triton"/"cpp") that cannot serve the call."""


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(_BACKEND_MODULES[name]), None
    except ImportError as error:  # e.g. triton missing from a CPU-only install
        return None, f"the {name} backend could not be imported ({error})"


# Imported once, at package import: resolution then is plain attribute access, which
# torch.compile traces without a graph break.
_LOADED = {name: _load(name) for name in BACKEND_PREFERENCE}


def backend_module(name: str) -> ModuleType:
    module, reason = _LOADED[name]
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def unavailable_reason(name: str, spec: AdapterSpec) -> str | None:
    module, reason = _LOADED[name]
    return reason if module is None else module.unavailable_reason(spec)


@dataclass(frozen=True)
class Explanation:
    """What `st_adapter` would do with these arguments: the backend, why, and any copy made."""

    backend: str
    reason: str
    copies: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # how the chosen backend runs this call (the backend's `describe`)

    def __str__(self) -> str:
        lines = [f"backend: {self.backend} ({self.reason})"]
        lines += [f"  note: {note}" for note in self.notes]
        lines += [f"  not {name}: {why}" for name, why in self.rejected.items()]
        lines += [f"  copy: {what}" for what in self.copies]
        return "\n".join(lines)


def _notes(name: str, spec: AdapterSpec) -> tuple[str, ...]:
    describe = getattr(_LOADED[name][0], "describe", None)
    note = describe(spec) if describe is not None else None
    return (note,) if note else ()


def resolve(spec: AdapterSpec, requested: str) -> Explanation:
    """Pick the backend for a validated call; raise BackendUnavailableError if a forced one can't serve."""
    copies = () if spec.channel_stride_ok else (
        "x is copied once because its channel dimension does not have stride 1",)
    if requested != "auto":
        why_not = unavailable_reason(requested, spec)
        if why_not is not None:
            raise BackendUnavailableError(f"backend={requested!r} cannot serve this call: {why_not}")
        return Explanation(requested, "forced by backend=" + repr(requested), copies,
                           notes=_notes(requested, spec))
    rejected = {}
    for name in BACKEND_PREFERENCE:
        why_not = unavailable_reason(name, spec)
        if why_not is None:
            return Explanation(name, "fastest eligible backend for backend='auto'", copies, rejected,
                               _notes(name, spec))
        rejected[name] = why_not
    raise AssertionError("the reference backend serves every validated call")
