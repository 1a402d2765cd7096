"""The cpp backend's GEMM paths: which ones this CPU has, how tests force each, what `explain`
says, and the C++ guard against a brgemm path the CPU cannot run.

`with_gemm_paths` and `force_gemm_path` are the parametrisation the other test_cpp_* modules use,
so every parity and determinism test runs on every GEMM path this machine has: MKL float32,
brgemm float32 (AVX2 and later), oneDNN 16-bit and brgemm 16-bit (AMX) where present.
"""

import os

import pytest
import torch

import stadapter_kernels as sk
from benchmarks.host import parse_cpuinfo
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


def test_the_kernel_refuses_a_brgemm_path_that_cannot_serve():
    # 16-bit brgemm takes widths that are multiples of 16 only, on AMX CPUs only: 40 x 24 never serves.
    case = Case(dtype=torch.bfloat16, channels=40, bottleneck=24)
    assert not fused_cpp.brgemm_serves(case.dtype, case.channels, case.bottleneck)
    inputs = make_inputs(case, seed=0)
    x = sk.spec.as_btlc(inputs["x"], case.layout, case.frames)
    params = [inputs[name] for name in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight",
                                        "fc2_bias", "cond")]
    with pytest.raises(RuntimeError, match="brgemm cannot serve"):
        torch.ops.stadapter_cpp.st_adapter_forward(torch.empty_like(x), x, *params, case.prefix, case.activation,
                                                   case.scale, 0, True, True)


def _measured_choice(monkeypatch, seconds: dict, *, native_hardware=True, amx=False):
    """The bfloat16 choice, made afresh with the GEMM timings and the CPU faked."""
    def best_gemm_seconds(dtype, repeats=8):
        if dtype not in seconds:
            raise AssertionError(f"timed {dtype}, which this choice should not need")
        return seconds[dtype]

    monkeypatch.setattr(fused_cpp, "calibration_seconds", {})
    monkeypatch.setattr(fused_cpp, "_best_gemm_seconds", best_gemm_seconds)
    monkeypatch.setattr(fused_cpp, "cpu_has_native_gemm", lambda dtype: native_hardware)
    monkeypatch.setattr(fused_cpp, "brgemm_serves", lambda dtype, channels, bottleneck: amx and dtype != torch.float32)
    choice = fused_cpp._choose_native_gemm(torch.bfloat16)
    monkeypatch.setitem(fused_cpp.native_gemm, torch.bfloat16, choice)
    return choice


@pytest.mark.parametrize("bf16_us, fp32_us, native", [
    (1574, 911, False),  # Intel Xeon, avx512_bf16, AMX off: oneDNN bf16 1.7x slower than MKL float32
    (500, 1000, True),   # AMD Zen 4: bf16 twice as fast
    (979, 900, True),    # within the margin: native (fewer bytes, and a choice that does not flip)
    (1120, 900, True),
    (1130, 900, False),  # float32 just over WIDEN_SPEEDUP (1.25) times faster
])
def test_native_16_bit_gemms_unless_float32_is_clearly_faster(bf16_us, fp32_us, native, monkeypatch):
    monkeypatch.delenv(fused_cpp.NATIVE_GEMM_ENV, raising=False)
    seconds = {torch.bfloat16: bf16_us * 1e-6, torch.float32: fp32_us * 1e-6}
    assert _measured_choice(monkeypatch, seconds) is native
    assert fused_cpp.calibration_seconds[torch.bfloat16] == (seconds[torch.bfloat16], seconds[torch.float32])
    case = Case(dtype=torch.bfloat16)
    notes = call(sk.explain, make_inputs(case, seed=0), case, backend="cpp").notes
    assert any(("native" if native else "widened to float32") in note and f"{bf16_us:.0f} us in bfloat16" in note
               for note in notes), notes


def test_no_timing_where_the_cpu_decides(monkeypatch):
    monkeypatch.delenv(fused_cpp.NATIVE_GEMM_ENV, raising=False)
    assert _measured_choice(monkeypatch, {}, native_hardware=False) is False  # AVX2: oneDNN bf16 is a fallback
    assert _measured_choice(monkeypatch, {}, amx=True) is True  # brgemm on AMX
    assert not fused_cpp.calibration_seconds


@pytest.mark.parametrize("value, native", [("0", False), ("1", True)])
def test_environment_overrides_the_measurement(value, native, monkeypatch):
    monkeypatch.setenv(fused_cpp.NATIVE_GEMM_ENV, value)
    assert _measured_choice(monkeypatch, {}) is native


def test_environment_value_must_be_0_or_1(monkeypatch):
    monkeypatch.setenv(fused_cpp.NATIVE_GEMM_ENV, "yes")
    with pytest.raises(ValueError, match=fused_cpp.NATIVE_GEMM_ENV + ".*'yes'"):
        _measured_choice(monkeypatch, {})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_this_cpus_choice_at_import_follows_its_measurement(dtype):
    # Unfaked: what this machine chose when the module was imported (measured, or decided by the CPU).
    if os.environ.get(fused_cpp.NATIVE_GEMM_ENV) in ("0", "1"):
        assert fused_cpp.native_gemm[dtype] == (fused_cpp.cpu_has_native_gemm(dtype)
                                                and os.environ[fused_cpp.NATIVE_GEMM_ENV] == "1")
    elif dtype in fused_cpp.calibration_seconds:
        native, widened = fused_cpp.calibration_seconds[dtype]
        assert 0 < native < 1 and 0 < widened < 1
        assert fused_cpp.native_gemm[dtype] == (native <= widened * fused_cpp.WIDEN_SPEEDUP)
    else:
        assert fused_cpp.native_gemm[dtype] == (fused_cpp.cpu_has_native_gemm(dtype)
                                                and fused_cpp.brgemm_serves(dtype, 768, 384))


@pytest.mark.parametrize("capability, vendor, bottleneck, expected", [
    ("AVX512", "Intel", 64, "brgemm/AVX-512"), ("AVX512", "Intel", 128, "brgemm/AVX-512"),
    ("AVX512", "Intel", 384, "MKL float32"), ("AVX512", "other", 384, "MKL float32"),
    ("AVX512", "AMD", 384, "brgemm/AVX-512"), ("AVX512", "AMD", 1024, "brgemm/AVX-512"),
    ("AVX2", "Intel", 64, "MKL float32"), ("AVX2", "AMD", 64, "MKL float32"), ("AVX2", "AMD", 384, "MKL float32"),
])
def test_float32_brgemm_by_default_on_avx512_narrow_bottlenecks_or_amd(capability, vendor, bottleneck, expected,
                                                                         monkeypatch):
    monkeypatch.setitem(fused_cpp.brgemm, torch.float32, None)
    monkeypatch.setattr(fused_cpp, "_CPU_CAPABILITY", capability)
    monkeypatch.setattr(fused_cpp, "_CPU_VENDOR", vendor)
    assert fused_cpp.gemm_path(torch.float32, 768, bottleneck) == expected


def test_an_extension_built_from_older_sources_is_reported_not_called(monkeypatch):
    monkeypatch.setattr(fused_cpp, "_EXTENSION_OPS", (*fused_cpp._EXTENSION_OPS, "op_of_a_newer_source"))
    reason = fused_cpp._load_extension()
    assert "older sources" in reason and "op_of_a_newer_source" in reason and "build_ext" in reason


def test_cpu_vendor_is_the_one_proc_cpuinfo_names():
    vendor = torch.ops.stadapter_cpp.cpu_vendor()
    assert vendor == fused_cpp._CPU_VENDOR
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            ids = {line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("vendor_id")}
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    assert len(ids) <= 1, ids  # none outside x86 (aarch64's cpuinfo names implementers instead)
    assert vendor == {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(ids.pop() if ids else "", "other")


def test_avx512_copy_runs_where_proc_cpuinfo_has_its_instructions():
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = parse_cpuinfo(cpuinfo.read()).flags
    except OSError:
        pytest.skip("no /proc/cpuinfo to compare with")
    has_them = {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags
    assert torch.ops.stadapter_cpp.avx512_available() == has_them
    assert fused_cpp.avx512 == (has_them and torch.backends.cpu.get_cpu_capability().startswith("AVX512"))
