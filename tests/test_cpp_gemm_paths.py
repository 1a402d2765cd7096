"""The cpp backend's GEMM paths: which ones this CPU has, how tests force each, what `explain`
says, and the C++ guard against a brgemm path the CPU cannot run.

`with_gemm_paths` and `force_gemm_path` are the parametrisation the other test_cpp_* modules use,
so every parity and determinism test runs on every GEMM path this machine has: MKL float32,
brgemm float32 (AVX2 and later), oneDNN 16-bit and brgemm 16-bit (AMX) where present.
"""

import pytest
import torch

import stadapter_kernels as sk
from parity import Case, call, force_cpp_path, make_inputs
from stadapter_kernels import fused_cpp

pytestmark = pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason=str(fused_cpp._BUILD_ERROR))


def with_gemm_paths(cases) -> list:
    """(case, patch rows per tile) -> (case, tile, native_gemm, brgemm) for every GEMM path the cpp
    backend can take for that case on this CPU."""
    if fused_cpp._BUILD_ERROR is not None:
        return []
    return [(case, tile, native, use_brgemm) for case, tile in cases
            for native, use_brgemm in fused_cpp.available_gemm_paths(case.dtype, case.channels, case.bottleneck)]


def force_gemm_path(monkeypatch, dtype: torch.dtype, tile: int, native_gemm: bool, brgemm: bool) -> None:
    """Make the cpp backend use this tiling and GEMM path for `dtype` in one test."""
    force_cpp_path(monkeypatch, dtype, tile, native_gemm)
    monkeypatch.setitem(fused_cpp.brgemm, dtype if native_gemm else torch.float32, brgemm)


def test_float32_brgemm_serves_on_every_cpu_the_extension_runs_on():
    # The extension needs AVX2 (fused_cpp._load_extension), where oneDNN's float32 ukernel runs.
    assert fused_cpp.brgemm_serves(torch.float32, 40, 24)
    assert (False, True) in fused_cpp.available_gemm_paths(torch.float32, 40, 24)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_brgemm_needs_whole_packed_blocks(dtype):
    # Widths that are not multiples of 16 never take 16-bit brgemm, whatever the CPU.
    assert not fused_cpp.brgemm_serves(dtype, 40, 24)
    assert (True, True) not in fused_cpp.available_gemm_paths(dtype, 40, 24)


PATH_CASES = [(Case(dtype=dtype, channels=64, bottleneck=32), 0) for dtype in fused_cpp.SUPPORTED_DTYPES]


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", with_gemm_paths(PATH_CASES), ids=str)
def test_explain_names_the_gemm_path(case, tile, native_gemm, brgemm, monkeypatch):
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    choice = call(sk.explain, make_inputs(case, seed=0), case, backend="cpp")
    gemm_dtype = case.dtype if native_gemm else torch.float32
    expected = ("brgemm/AMX" if gemm_dtype != torch.float32 else "brgemm/AV") if brgemm else (
        "oneDNN" if gemm_dtype != torch.float32 else "MKL float32")
    if case.dtype == torch.float32 and not brgemm:
        assert not choice.notes  # float32 on MKL: the one way float32 ran before brgemm, nothing to say
    else:
        assert any(expected in note for note in choice.notes), choice
    assert fused_cpp.gemm_path(case.dtype, case.channels, case.bottleneck).startswith(expected)


@pytest.mark.skipif(fused_cpp._BUILD_ERROR is None and fused_cpp.brgemm_serves(torch.bfloat16, 64, 32),
                    reason="this CPU runs bfloat16 brgemm")
def test_the_kernel_refuses_a_brgemm_path_this_cpu_lacks():
    case = Case(dtype=torch.bfloat16, channels=64, bottleneck=32)
    inputs = make_inputs(case, seed=0)
    x = sk.spec.as_btlc(inputs["x"], case.layout, case.frames)
    params = [inputs[name] for name in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight",
                                        "fc2_bias", "cond")]
    with pytest.raises(RuntimeError, match="brgemm cannot serve"):
        torch.ops.stadapter_cpp.st_adapter_forward(torch.empty_like(x), x, *params, case.prefix, case.activation,
                                                   case.scale, 0, True, True)
