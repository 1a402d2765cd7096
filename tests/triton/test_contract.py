"""The backend contract beyond parity: what the Triton backend accepts, what autograd keeps
alive between forward and backward, and deterministic gradients."""

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, call, make_inputs, op_kwargs
from stadapter_kernels import fused_triton
from stadapter_kernels.spec import validate


def _spec(case: Case, **changes):
    case = case.with_(**changes)
    inputs = make_inputs(case, seed=0)
    return validate(*(inputs[name] for name in INPUT_NAMES[:7]), cond=inputs["cond"], **op_kwargs(case))


def test_serves_cpu_tensors_only_in_the_interpreter(monkeypatch):
    spec = _spec(Case())
    assert fused_triton.unavailable_reason(spec) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in fused_triton.unavailable_reason(spec)


@pytest.mark.parametrize("changes, words", [
    (dict(dtype=torch.float64), "dtype"),
    (dict(kernel_hw=3, tokens=10), "spatial"),
    (dict(kernel_t=7), "kt=7"),
    (dict(bottleneck=520), "Ca=520"),
])
def test_says_why_it_cannot_serve(changes, words):
    reason = fused_triton.unavailable_reason(_spec(Case(), **changes))
    assert reason is not None and words in reason


def test_saves_no_bottleneck_for_backward():
    """Nothing of tokens x Ca elements (y, z, a) is kept between forward and backward."""
    case = Case(batch=2, frames=3, tokens=21, channels=40, bottleneck=48, cond=True)
    tokens_x_bottleneck = case.batch * case.frames * (case.tokens - case.prefix) * case.bottleneck
    inputs = {n: (t.requires_grad_() if t is not None else None) for n, t in make_inputs(case, seed=1).items()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = call(sk.st_adapter, inputs, case, backend="triton")
    assert saved, "the hook saw nothing: the op's autograd did not run"
    assert inputs["x"].numel() < tokens_x_bottleneck  # so x itself cannot be mistaken for a bottleneck
    too_big = [tuple(t.shape) for t in saved if t.numel() >= tokens_x_bottleneck]
    assert not too_big, f"tensors of >= tokens x Ca elements saved for backward: {too_big}"
    out.sum().backward()
    assert inputs["x"].grad is not None


def test_gradients_are_deterministic():
    case = Case(batch=2, frames=3, tokens=38, bottleneck=24, cond=True, dtype=torch.bfloat16)
    inputs = make_inputs(case, seed=2)
    grad_out = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(3)).to(case.dtype)

    def gradients():
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
        out = call(sk.st_adapter, {n: leaves.get(n) for n in INPUT_NAMES}, case, backend="triton")
        return torch.autograd.grad(out, list(leaves.values()), grad_out)

    for first, second in zip(gradients(), gradients()):
        assert torch.equal(first, second)
