"""What the fused forward kernel reads and writes, counted element by element in the interpreter.

Every tl.load and tl.store of an interpreted kernel goes through `InterpreterBuilder`, so the
addresses each one touches can be recorded and attributed to tensors (GPU-FREE.md). This checks
the forward's design claims on real launches rather than in a model: the output is written once,
x is read only by the down-projection (once per BLOCK_A chunk of the bottleneck) and the
residual, and nothing else is written but the per-program scratch ring, whose size does not
grow with the number of tokens.
"""

import contextlib
import math

import numpy as np
import pytest
import torch
from triton.runtime import interpreter

import stadapter_kernels as sk
from parity import Case, call, make_inputs
from stadapter_kernels.fused_triton import configs


@contextlib.contextmanager
def recorded_accesses():
    """Yield (loads, stores): the byte addresses each memory op touched, one array per op."""
    builder = interpreter.InterpreterBuilder
    original_load, original_store = builder.create_masked_load, builder.create_masked_store
    loads, stores = [], []

    def touched(ptrs, mask):
        return ptrs.data[np.broadcast_to(mask.data, ptrs.data.shape)].astype(np.uint64)

    def load(self, ptrs, mask, *args):
        loads.append(touched(ptrs, mask))
        return original_load(self, ptrs, mask, *args)

    def store(self, ptrs, value, mask, *args):
        stores.append(touched(ptrs, mask))
        return original_store(self, ptrs, value, mask, *args)

    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield loads, stores
    finally:
        builder.create_masked_load, builder.create_masked_store = original_load, original_store


def counts(accesses, tensor: torch.Tensor) -> np.ndarray:
    """How often each element of `tensor` was touched, in its (contiguous) element order."""
    start = tensor.data_ptr()
    touched = np.concatenate(accesses) if accesses else np.zeros(0, np.uint64)
    inside = touched[(touched >= start) & (touched < start + tensor.numel() * tensor.element_size())]
    index = ((inside - np.uint64(start)) // np.uint64(tensor.element_size())).astype(np.int64)
    return np.bincount(index, minlength=tensor.numel()).reshape(tensor.shape)


# B * T * P * Ca well above the scratch ring of the interpreter's 3 programs, so "no tokens x Ca
# buffer" has teeth; Ca = 136 spans three BLOCK_A = 64 chunks of the bottleneck.
@pytest.mark.parametrize("bottleneck", [48, 136])
def test_forward_reads_x_per_chunk_and_writes_out_once(bottleneck):
    case = Case(batch=2, frames=16, tokens=38, channels=40, bottleneck=bottleneck, prefix=1, activation="gelu",
                cond=True, layout="btlc")
    inputs = make_inputs(case, seed=0)
    x = inputs["x"]
    # One T chunk: more chunks re-read x for their halo frames (the chunking's price).
    with torch.no_grad(), configs.forced(variant="fused", frames_per_chunk=case.frames), \
            recorded_accesses() as (loads, stores):
        out = call(sk.st_adapter, inputs, case, backend="triton")

    chunks = math.ceil(bottleneck / configs.block_a(bottleneck, x.dtype))
    x_reads = counts(loads, x)
    assert (x_reads[:, :, :case.prefix] == 1).all(), "prefix tokens are copied through, read once"
    assert (x_reads[:, :, case.prefix:] == chunks + 1).all(), (
        f"patch tokens: read {np.unique(x_reads[:, :, case.prefix:])} times, expected {chunks} "
        "(down-projection, per chunk) + 1 (residual)")
    assert (counts(stores, out) == 1).all(), "every output element is written exactly once"
    assert not counts(stores, x).any(), "x is never written"

    # Everything else written is the per-program ring of kt bottleneck tiles plus the activated tile.
    out_range = (out.data_ptr(), out.data_ptr() + out.numel() * out.element_size())
    elsewhere = np.unique(np.concatenate(stores))
    elsewhere = elsewhere[(elsewhere < out_range[0]) | (elsewhere >= out_range[1])]
    block_p = configs.configs_for("forward", bottleneck)[0].block_p
    ring_elements = configs.INTERPRETER_PROGRAMS * (case.kernel_t + 1) * block_p * configs.ca_pad(bottleneck)
    tokens_x_bottleneck = case.batch * case.frames * (case.tokens - case.prefix) * bottleneck
    assert ring_elements < tokens_x_bottleneck
    assert len(elsewhere) <= ring_elements, (
        f"{len(elsewhere)} elements written outside out, more than the scratch ring's {ring_elements}")
