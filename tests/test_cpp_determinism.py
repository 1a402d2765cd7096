"""The C++ backend's results do not depend on the thread count: bit-identical output and
gradients with 1 and 2 threads (fixed tiling, weight-gradient partials summed in a fixed order)."""

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, assert_matches_oracle, call, make_inputs
from stadapter_kernels import fused_cpp
from test_cpp_gemm_paths import force_gemm_path, with_gemm_paths

pytestmark = pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason=str(fused_cpp._BUILD_ERROR))


def run(case, inputs, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
        out = call(sk.st_adapter, {n: leaves.get(n) for n in INPUT_NAMES}, case, backend="cpp")
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(case.dtype)
        return out, torch.autograd.grad(out, list(leaves.values()), grad_out)
    finally:
        torch.set_num_threads(previous)


def assert_bit_identical(case, inputs, threads):
    """Output and every gradient equal, bit for bit, whichever of `threads` thread counts runs them."""
    (out_a, grads_a), (out_b, grads_b) = (run(case, inputs, n) for n in threads)
    assert torch.equal(out_a, out_b)
    for name, grad_a, grad_b in zip([n for n in INPUT_NAMES if inputs[n] is not None], grads_a, grads_b):
        assert torch.equal(grad_a, grad_b), name


CASES = [
    # 2 x 4 tiles of 3 patches (one reduction group per tile)
    (Case(cond=True), 3),
    # 2 x 10 tiles: 20 tiles in 8 groups of 2-3 tiles
    (Case(cond=True, activation="silu"), 1),
    # one tile in all (P = 10): the single-task path of at::parallel_for
    (Case(batch=1, cond=True), 10),
    # one tile with GEMMs large enough for oneDNN / MKL to split them over threads if let
    (Case(batch=1, frames=3, tokens=97, channels=256, bottleneck=128, dtype=torch.bfloat16), 96),
    # 11 frames: the native backward's weight gradients in chunks of 8 + 3 frames
    (Case(batch=1, frames=11, dtype=torch.bfloat16, cond=True), 0),
    # ViT-like frame, the kernel's own tiling, the benchmark's bottleneck
    (Case(batch=2, frames=4, tokens=197, channels=64, bottleneck=384, activation="identity"), 0),
    (Case(dtype=torch.bfloat16, layout="lnc", cond=True), 3),
    # widths 16-bit brgemm takes on AMX; the branch alone
    (Case(batch=1, frames=4, tokens=33, channels=64, bottleneck=48, dtype=torch.bfloat16, cond=True), 0),
    (Case(residual=False, cond=True), 3),
]
# Every case on every GEMM path this CPU has: widened to float32 and native 16-bit GEMMs (oneDNN,
# which parallelises with OpenMP unless pinned), each through the library GEMM and brgemm.
GEMM_CASES = with_gemm_paths(CASES)


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", GEMM_CASES, ids=str)
def test_bit_identical_with_one_and_two_threads(case, tile, native_gemm, brgemm, monkeypatch):
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    assert_bit_identical(case, make_inputs(case, seed=3), threads=(1, 2))


# Fewer tiles than threads (batch 1 gets two tiles): with 4 threads the forward also splits T into runs
# that each re-project a kt//2 halo. The output must not change with the split, and must match
# the oracle; T < threads and kt > T stress the run edges. (case, patch rows per tile, 0 = the
# kernel's choice): one whole-frame tile (P = 10) of back-to-back frames makes the native forward
# project several frames per GEMM, in blocks that start where each run starts; at 196 x 200 two
# frames make a block, so runs starting at odd frames shift every block by one frame. brgemm's
# forward takes frames in runs of one weight's calls (8 frames at 196 x 384), 8 + 3 of 11 frames on
# one thread, other runs on four, and with kt = 5 a ring of kt + 7 frames.
SPLIT_CASES = [
    (Case(batch=1, frames=5, kernel_t=3, cond=True), 0),
    (Case(batch=1, frames=4, kernel_t=5), 0),
    (Case(batch=1, frames=2, kernel_t=5, activation="silu"), 0),
    (Case(batch=1, frames=7, kernel_t=1, activation="relu"), 0),
    (Case(batch=1, frames=6, kernel_t=3, dtype=torch.bfloat16, layout="lnc", prefix=0, tokens=10), 0),
    (Case(batch=1, frames=9, kernel_t=3, dtype=torch.bfloat16, cond=True), 10),
    (Case(batch=1, frames=9, kernel_t=5, dtype=torch.bfloat16, layout="btlc", prefix=2, tokens=12), 10),
    (Case(batch=1, frames=9, tokens=197, channels=32, bottleneck=200, dtype=torch.bfloat16), 196),
    (Case(batch=1, frames=11, tokens=197, channels=32, bottleneck=384, dtype=torch.bfloat16, cond=True), 196),
    (Case(batch=1, frames=7, kernel_t=5, tokens=197, channels=32, bottleneck=384, dtype=torch.bfloat16,
          activation="relu"), 196),
    (Case(batch=1, frames=6, tokens=17, channels=64, bottleneck=32, dtype=torch.bfloat16, residual=False), 0),
]
SPLIT_GEMM_CASES = with_gemm_paths(SPLIT_CASES)


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", SPLIT_GEMM_CASES, ids=str)
def test_forward_split_over_frames_changes_no_bit(case, tile, native_gemm, brgemm, monkeypatch):
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    assert_bit_identical(case, make_inputs(case, seed=5), threads=(1, 4))
    previous = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        assert_matches_oracle(case, backend="cpp")
    finally:
        torch.set_num_threads(previous)
