"""Same bits whatever the config, the T chunking and the run (configs' module docstring says why).

Every shipped config of every kernel is forced in turn, with several chunk lengths; outputs and
every gradient must equal the first run bit for bit. bf16 and fp32 inputs, so every rounding
of a stored intermediate and every fp32 partial sum is exercised; P = 37 leaves a partial
16-row group and a partial tile.

The interpreter's tl.dot is numpy's matmul, whose BLAS kernel (and so the order it sums each
element's products in) changes with the tile's row count: float32 products then differ in the
last bit between BLOCK_P 16 and 32. A GPU's MMA sums each output element's K products in an
order fixed by the instruction, whatever the tile's rows; `mma_like_dot` stands in for that
with exact (float64) products and sums rounded once, so what remains to differ between configs
is what the kernels themselves order: their K steps and row sums.
"""

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, call, make_inputs
from stadapter_kernels.fused_triton import configs
from test_parity import CONFIG_INDICES, forced_config_index

CASE = Case(batch=2, frames=5, tokens=38, channels=40, bottleneck=24, kernel_t=3, prefix=1, activation="gelu",
            scale=0.5, cond=True)


@pytest.fixture
def mma_like_dot(monkeypatch):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        exact = np.matmul(a.data.astype(np.float64), b.data.astype(np.float64)) + d.data.astype(np.float64)
        return interpreter.TensorHandle(exact.astype(d.data.dtype), d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def output_and_gradients(case: Case, inputs: dict, grad_out: torch.Tensor) -> dict[str, torch.Tensor]:
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
    out = call(sk.st_adapter, {n: leaves.get(n) for n in INPUT_NAMES}, case, backend="triton")
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
    return {"out": out.detach(), **{f"d_{name}": g for name, g in zip(leaves, grads)}}


def assert_same_bits(expected: dict, actual: dict, what: str) -> None:
    differing = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not differing, f"{what}: not bit-equal to the first run: {differing}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("variant", configs.VARIANTS)
def test_bits_do_not_depend_on_config_or_chunking(variant, dtype, mma_like_dot):
    case = CASE.with_(dtype=dtype)
    inputs = make_inputs(case, seed=4)
    grad_out = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    with configs.forced(variant=variant):
        first = output_and_gradients(case, inputs, grad_out)
        assert_same_bits(first, output_and_gradients(case, inputs, grad_out), "a second run")
        for index in CONFIG_INDICES:
            forced = forced_config_index(variant, case.bottleneck, index)
            for length in (1, 2, case.frames):
                with configs.forced(frames_per_chunk=length, **forced):
                    assert_same_bits(first, output_and_gradients(case, inputs, grad_out),
                                     f"configs {forced}, {length} frames per chunk")
