"""torch.autograd.gradcheck in float64 of the reference backend: x, every weight and bias, cond."""

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, make_inputs, op_kwargs


@pytest.mark.parametrize("case", [
    Case(dtype=torch.float64, cond=True, activation="gelu", frames=3, tokens=6, channels=6, bottleneck=5),
    Case(dtype=torch.float64, cond=True, activation="silu", kernel_t=5, frames=2, tokens=4, prefix=0,
         channels=5, bottleneck=3, layout="lnc"),
    Case(dtype=torch.float64, activation="quick_gelu", kernel_t=3, kernel_hw=3, frames=2, tokens=10,
         channels=4, bottleneck=3, layout="btlc"),
    Case(dtype=torch.float64, cond=True, activation="gelu_tanh", frames=2, tokens=5, channels=4, bottleneck=3),
], ids=str)
def test_gradcheck(case):
    inputs = make_inputs(case, seed=1)
    names = [n for n in INPUT_NAMES if inputs[n] is not None]
    leaves = [inputs[n].requires_grad_() for n in names]

    def fn(*tensors):
        given = dict(zip(names, tensors))
        return sk.st_adapter(*(given.get(n) for n in INPUT_NAMES[:7]), cond=given.get("cond"),
                             backend="reference", **op_kwargs(case))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)
