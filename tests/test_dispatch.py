"""`backend="auto"` resolution, `explain`, forced backends, autocast and the channel-stride copy."""

import pytest
import torch

import stadapter_kernels as sk
from parity import Case, call, make_inputs, rel_error
from stadapter_kernels import fused_cpp
from stadapter_kernels.dispatch import unavailable_reason
from stadapter_kernels.reference import oracle

CASE = Case(cond=True)


def explain(case, inputs, **extra):
    return call(sk.explain, inputs, case, **extra)


def test_auto_on_cpu_picks_cpp_if_built_else_reference():
    inputs = make_inputs(CASE, seed=0)
    choice = explain(CASE, inputs)
    assert choice.backend in ("cpp", "reference")
    assert "triton" in choice.rejected  # CPU tensors never go to Triton unless forced
    if choice.backend == "reference":
        assert "cpp" in choice.rejected
    assert choice.backend in str(choice)


def test_spatial_kernel_falls_back_to_the_reference_and_says_why():
    case = CASE.with_(kernel_hw=3, tokens=10)
    choice = explain(case, make_inputs(case, seed=0))
    assert choice.backend == "reference"
    assert choice.rejected and all(choice.rejected.values())


def test_forcing_a_backend_that_cannot_serve_raises():
    case = CASE.with_(kernel_hw=3, tokens=10)
    inputs = make_inputs(case, seed=0)
    for backend in ("cpp", "triton"):
        with pytest.raises(sk.BackendUnavailableError, match=f"backend='{backend}' cannot serve"):
            call(sk.st_adapter, inputs, case, backend=backend)


def test_forced_reference_is_reported():
    inputs = make_inputs(CASE, seed=0)
    assert explain(CASE, inputs, backend="reference").backend == "reference"


def test_non_unit_channel_stride_is_copied_once_and_stated():
    case = CASE.with_(layout="btlc")
    inputs = make_inputs(case, seed=0)
    x = inputs["x"].transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, channel stride != 1
    inputs = dict(inputs, x=x)
    choice = explain(case, inputs)
    assert any("stride" in c for c in choice.copies)
    out = call(sk.st_adapter, inputs, case)
    expected = call(oracle, inputs, case)
    assert rel_error(out, expected) < 1e-5


def test_autocast_runs_in_the_autocast_dtype():
    inputs = make_inputs(CASE, seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = call(sk.st_adapter, inputs, CASE)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, call(oracle, inputs, CASE)) < 1e-2


def test_unavailable_reason_is_a_sentence_or_none():
    from stadapter_kernels.spec import validate
    inputs = make_inputs(CASE, seed=0)
    spec = validate(*list(inputs.values())[:7], cond=inputs["cond"], num_frames=3, prefix=1,
                    activation="gelu", scale=0.5, layout="nlc")
    assert unavailable_reason("reference", spec) is None
    assert isinstance(unavailable_reason("triton", spec), str)


@pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason="needs the C++ extension")
@pytest.mark.parametrize("native_gemm, words", [(True, "native"), (False, "widened to float32")])
def test_explain_says_how_cpp_runs_bfloat16_gemms(native_gemm, words, monkeypatch):
    monkeypatch.setitem(fused_cpp.native_gemm, torch.bfloat16, native_gemm)
    case = CASE.with_(dtype=torch.bfloat16)
    choice = explain(case, make_inputs(case, seed=0), backend="cpp")
    assert any(words in note for note in choice.notes), choice
    assert words in str(choice)
    monkeypatch.setitem(fused_cpp.brgemm, torch.float32, False)
    assert not explain(CASE, make_inputs(CASE, seed=0), backend="cpp").notes  # float32 on MKL: nothing to say


@pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason="needs the C++ extension")
def test_explain_says_relu_recomputes_the_bottleneck_in_float32(monkeypatch):
    monkeypatch.setitem(fused_cpp.native_gemm, torch.bfloat16, True)
    monkeypatch.setitem(fused_cpp.brgemm, torch.bfloat16, False)  # brgemm (AMX) rounds no y: no float32 recompute
    case = CASE.with_(dtype=torch.bfloat16, activation="relu")
    choice = explain(case, make_inputs(case, seed=0), backend="cpp")
    assert any("float32 GEMM" in note for note in choice.notes), choice
    gelu = CASE.with_(dtype=torch.bfloat16, activation="gelu")
    assert not any("float32 GEMM" in note for note in explain(gelu, make_inputs(gelu, seed=0), backend="cpp").notes)
