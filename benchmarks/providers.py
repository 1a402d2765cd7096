"""The five providers and the callables the runner times, for one adapter and for a whole model.

    official   the official ST-Adapter data flow, re-implemented: fc1, permute to channels-first
               (.contiguous()), depthwise nn.Conv3d (kt, 1, 1), permute back (.contiguous()), fc2,
               in-place residual on x[:, 1:]
    reference  stadapter_kernels.st_adapter(backend="reference"), eager
    compile    torch.compile of the reference (config.COMPILE_MODE, else "default")
    fused      backend="auto" when it resolves to a fused backend (triton on CUDA, cpp on CPU);
               otherwise unavailable, with explain()'s reason
    floor      the adapter's GEMMs alone (torch.mm): 2 for forward, 6 for forward + backward;
               in the model modes, the backbone without adapters

A builder returns a `Case`: `run()` is timed (in forward mode it returns the output, which the
runner checks against the reference's), `saved()` runs one forward with grad for the
saved-tensor accounting. A provider that cannot serve raises `Unavailable(reason)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import stadapter_kernels
from stadapter_kernels import fused_cpp

from . import config


class Unavailable(Exception):
    """The provider cannot run this case; the message says why."""


@dataclass(frozen=True)
class Shape:
    """One adapter call: B videos of T frames, L tokens (prefix of them passed through), C -> Ca."""

    B: int
    T: int
    L: int
    C: int
    Ca: int
    kt: int = config.KERNEL_T
    prefix: int = config.PREFIX

    @property
    def rows(self) -> int:
        """N = B*T*(L - prefix): the patch tokens, the M dimension of every GEMM."""
        return self.B * self.T * (self.L - self.prefix)

    @property
    def tokens(self) -> int:
        return self.B * self.T * self.L

    def label(self) -> str:
        return f"B{self.B} T{self.T} L{self.L} C{self.C} Ca{self.Ca}"


@dataclass
class Case:
    run: Callable[[], object]
    saved: Optional[Callable[[], object]] = None  # one forward with grad enabled, output returned
    backend: str = ""  # what actually runs (explain()'s backend, or the torch path)
    notes: list[str] = field(default_factory=list)
    existing: list = field(default_factory=list)  # inputs and parameters: alive anyway, not activations


class OfficialAdapter(nn.Module):
    """The official ST-Adapter forward (linziyi96/st-adapter), with the same parameter names."""

    def __init__(self, dim: int, bottleneck: int, kernel_t: int = config.KERNEL_T):
        super().__init__()
        self.fc1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, kernel_size=(kernel_t, 1, 1),
                              padding=(kernel_t // 2, 0, 0), groups=bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, tokens, _ = x.shape
        batch, ca = bt // num_frames, self.conv.in_channels
        side = math.isqrt(tokens - 1)
        x_id = x
        x = self.fc1(x[:, 1:, :])
        x = x.view(batch, num_frames, side, side, ca).permute(0, 4, 1, 2, 3).contiguous()
        x = self.conv(x)
        x = x.permute(0, 2, 3, 4, 1).contiguous().view(bt, tokens - 1, ca)
        x = self.fc2(x)
        x_id[:, 1:, :] += x
        return x_id


def init_adapter_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random small weights (a trained adapter, not the zero init), so every stage does real work.

    fc2's weight and bias are then projected off fc1's row space (fc1 . fc2 = 0): the adapter
    branch never feeds back into its own bottleneck, so repeated in-place application (the
    official module in forward mode, thousands of calls under do_bench) grows x only linearly,
    never overflowing float16.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            std = 0.1 if name.startswith("conv") else 0.02
            p.copy_(torch.randn(p.shape, generator=generator) * std)
        if isinstance(getattr(module, "fc1", None), nn.Linear):
            basis, _ = torch.linalg.qr(module.fc1.weight.T.double())  # (C, Ca), orthonormal
            for p in (module.fc2.weight, module.fc2.bias[:, None]):
                p.sub_((basis @ (basis.T @ p.double())).to(p.dtype))
    return module


def micro_case(provider: str, mode: str, shape: Shape, dtype: torch.dtype, device: str) -> Case:
    """The callable for one adapter in `mode` ("forward" or "forward_backward")."""
    grad = mode == "forward_backward"
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(shape.B * shape.T, shape.L, shape.C, generator=generator).to(device, dtype)
    grad_out = torch.randn(x.shape, generator=generator).to(device, dtype)
    if provider == "floor":
        return _floor_case(shape, dtype, device, grad)

    official = init_adapter_(OfficialAdapter(shape.C, shape.Ca, shape.kt)).to(device, dtype)
    params = [official.fc1.weight, official.fc1.bias, official.conv.weight, official.conv.bias,
              official.fc2.weight, official.fc2.bias]
    for p in params:
        p.requires_grad_(grad)
    x.requires_grad_(grad)
    notes = []

    if provider == "official":
        if grad:
            # x is an autograd leaf here and the official residual is in place, which autograd
            # forbids on a leaf: it runs on a clone, timed with it (in a model x is an
            # intermediate and needs none; see the model modes).
            notes.append("in-place residual runs on x.clone() (x is a leaf here); the clone is timed")
            forward = lambda: official(x.clone(), shape.T)
        else:
            forward = lambda: official(x, shape.T)
        backend = "torch (nn.Linear, nn.Conv3d)"
    else:
        backend_arg = "reference" if provider in ("reference", "compile") else "auto"
        call = lambda inp: stadapter_kernels.st_adapter(inp, *params, num_frames=shape.T, prefix=shape.prefix,
                                                        backend=backend_arg)
        explanation = stadapter_kernels.explain(x, *params, num_frames=shape.T, prefix=shape.prefix,
                                                backend=backend_arg)
        if provider == "fused" and explanation.backend not in ("triton", "cpp"):
            raise Unavailable(fused_reason(explanation))
        backend = explanation.backend
        if provider == "compile":
            call = compiled(call, notes)
            backend = "inductor(reference)"
        forward = lambda: call(x)

    if grad:
        def run():
            x.grad = None
            for p in params:
                p.grad = None
            forward().backward(grad_out)
    else:
        def run():
            with torch.no_grad():
                return forward()
    return Case(run=run, saved=forward if grad else None, backend=backend, notes=notes, existing=[x, *params])


def fused_reason(explanation) -> str:
    fused = {name: why for name, why in explanation.rejected.items() if name in ("triton", "cpp")}
    return "; ".join(f"{name}: {why}" for name, why in fused.items()) or str(explanation)


def _floor_case(shape: Shape, dtype: torch.dtype, device: str, grad: bool) -> Case:
    """The adapter's GEMMs alone on the same shapes, N = B*T*(L-1)."""
    n, c, ca = shape.rows, shape.C, shape.Ca
    generator = torch.Generator().manual_seed(2)
    rand = lambda *s: (torch.randn(*s, generator=generator) * 0.02).to(device, dtype)
    x, w1t, w2t = rand(n, c), rand(c, ca), rand(ca, c)
    y, dout = rand(n, ca), rand(n, c)
    w1, w2 = w1t.T.contiguous(), w2t.T.contiguous()

    def forward():
        return torch.mm(torch.mm(x, w1t), w2t)

    def forward_backward():
        a = torch.mm(x, w1t)  # (N x C) @ (C x Ca)
        torch.mm(a, w2t)  # (N x Ca) @ (Ca x C)
        dy = torch.mm(dout, w2)  # dL/da: (N x C) @ (C x Ca)
        torch.mm(dout.T, y)  # dL/dfc2: (C x N) @ (N x Ca)
        torch.mm(dy, w1)  # dL/dx: (N x Ca) @ (Ca x C)
        return torch.mm(dy.T, x)  # dL/dfc1: (Ca x N) @ (N x C)

    notes = []
    if device == "cpu" and dtype != torch.float32 and not fused_cpp.cpu_has_native_gemm(dtype):
        # CPUs without native bf16/fp16 GEMMs (AVX2 ones) run these torch.mm calls far below
        # their float32 speed, while a fused kernel may widen its tiles to float32.
        notes.append(f"torch.mm in {dtype} on CPU ({torch.backends.cpu.get_cpu_capability()}): "
                     "not a lower bound without native low-precision GEMMs")
    elif device == "cpu" and dtype != torch.float32 and not fused_cpp.native_gemm[dtype]:
        notes.append(f"torch.mm in {dtype} measured slower than in float32 on this CPU, where the cpp "
                     "kernel widens its GEMMs: not a lower bound")
    return Case(run=forward_backward if grad else forward, backend="torch.mm x6" if grad else "torch.mm x2",
                notes=notes)


def compiled(fn: Callable, notes: list[str]) -> Callable:
    """torch.compile `fn` in config.COMPILE_MODE; if compiling fails there, fall back to "default".

    Compilation is lazy, so the fallback wraps the call; the runner triggers the first one untimed.
    The mode that ran is appended to `notes`, and rewritten on fallback.
    """
    state = {"fn": torch.compile(fn, mode=config.COMPILE_MODE), "mode": config.COMPILE_MODE}
    notes.append(f"torch.compile mode={config.COMPILE_MODE}")
    index = len(notes) - 1

    def call(*args):
        try:
            return state["fn"](*args)
        except Exception as error:  # inductor raises many types; any failure means fall back
            if state["mode"] == "default":
                raise
            torch._dynamo.reset()
            state.update(fn=torch.compile(fn), mode="default")
            notes[index] = (f"torch.compile mode={config.COMPILE_MODE} failed ({type(error).__name__}); "
                            "fell back to mode=default")
            return state["fn"](*args)

    return call
