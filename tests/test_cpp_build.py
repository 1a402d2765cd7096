"""Without the compiled extension (an install with STADAPTER_SKIP_CPP_BUILD=1) the package still
imports, `auto` runs the reference on CPU and `explain` says the extension is not built; and bad
input forced through backend="cpp" gets the same errors as the reference."""

import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import stadapter_kernels as sk
from parity import Case, make_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in a fresh interpreter where importing stadapter_kernels._C fails, as it does when the
# extension was never compiled, whether or not this checkout has built it.
WITHOUT_EXTENSION = textwrap.dedent("""
    import importlib.abc, sys

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "stadapter_kernels._C":
                raise ImportError("No module named 'stadapter_kernels._C'")

    sys.meta_path.insert(0, BlockExtension())
    sys.path.insert(0, "tests")
    import torch
    import stadapter_kernels as sk
    from parity import Case, call, make_inputs, rel_error
    from stadapter_kernels.reference import oracle

    case = Case(cond=True)
    inputs = make_inputs(case, seed=0)
    choice = call(sk.explain, inputs, case)
    print("BACKEND", choice.backend)
    print("WHY", choice.rejected["cpp"])
    print("ERROR", rel_error(call(sk.st_adapter, inputs, case), call(oracle, inputs, case)))
    try:
        call(sk.st_adapter, inputs, case, backend="cpp")
    except sk.BackendUnavailableError as error:
        print("FORCED", error)
""")


def test_without_the_extension_auto_uses_the_reference_and_explain_says_why():
    result = subprocess.run([sys.executable, "-c", WITHOUT_EXTENSION], cwd=ROOT, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["BACKEND"] == "reference"
    assert "stadapter_kernels._C is not built" in lines["WHY"] and "STADAPTER_SKIP_CPP_BUILD" in lines["WHY"]
    assert float(lines["ERROR"]) < 1e-5
    assert "backend='cpp' cannot serve" in lines["FORCED"] and "not built" in lines["FORCED"]


def test_cpp_rejects_what_it_cannot_serve_with_a_reason():
    from stadapter_kernels import fused_cpp

    if fused_cpp._BUILD_ERROR is not None:
        pytest.skip(fused_cpp._BUILD_ERROR)
    for dtype, expected in ((torch.float64, "float64 is not supported"),):
        case = Case(dtype=dtype)
        with pytest.raises(sk.BackendUnavailableError, match=expected):
            sk.st_adapter(*(make_inputs(case, seed=0)[n] for n in ("x", "fc1_weight", "fc1_bias", "conv_weight",
                                                                 "conv_bias", "fc2_weight", "fc2_bias")),
                          num_frames=case.frames, backend="cpp")


BAD_INPUTS = {
    "x rank": lambda i, k: i.__setitem__("x", i["x"][0]),
    "fc1 shape": lambda i, k: i.__setitem__("fc1_weight", i["fc1_weight"][:, :-1]),
    "conv even kt": lambda i, k: i.__setitem__("conv_weight", i["conv_weight"][:, :, :2]),
    "dtype mismatch": lambda i, k: i.__setitem__("fc2_weight", i["fc2_weight"].double()),
    "cond shape": lambda i, k: k.__setitem__("cond", torch.zeros(5, 24)),
    "prefix too large": lambda i, k: k.__setitem__("prefix", 11),
    "bad activation": lambda i, k: k.__setitem__("activation", "tanh"),
    "frames not dividing": lambda i, k: k.__setitem__("num_frames", 4),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_through_cpp_gets_the_reference_error(name):
    def error_of(backend):
        inputs = make_inputs(Case(), seed=0)
        kwargs = dict(num_frames=3, prefix=1, activation="gelu", cond=None)
        BAD_INPUTS[name](inputs, kwargs)
        x_before = inputs["x"].clone()
        with pytest.raises((TypeError, ValueError)) as info:
            sk.st_adapter(*(inputs[n] for n in ("x", "fc1_weight", "fc1_bias", "conv_weight", "conv_bias",
                                                "fc2_weight", "fc2_bias")), backend=backend, **kwargs)
        assert torch.equal(inputs["x"], x_before)
        return type(info.value), str(info.value)

    assert error_of("cpp") == error_of("reference")


@pytest.mark.skipif(os.environ.get("STADAPTER_SKIP_CPP_BUILD") == "1", reason="installed without the extension on purpose")
def test_the_extension_is_built_unless_the_build_was_skipped():
    """Otherwise a failed build would only turn the C++ parity tests into skips."""
    from stadapter_kernels import fused_cpp

    assert fused_cpp._BUILD_ERROR is None


# A 512-bit or EVEX-only register: zmm, xmm/ymm 16-31, an opmask.
AVX512_REGISTER = re.compile(r"%zmm\d|%[xy]mm(1[6-9]|2\d|3[01])\b|%k[1-7]\b")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the AVX-512 copy of the kernels is built on x86-64 only")
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
def test_only_the_avx512_copy_of_the_kernels_uses_avx512():
    """The extension holds two copies of the kernels (csrc/st_adapter_cpu_avx512.cpp): an inline
    function both emit must be linked from the baseline copy, or an AVX2-only CPU would run the
    AVX-512 one. So every function with an AVX-512 register lives in namespace stadapter::AVX512."""
    from stadapter_kernels import _C

    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True,
                             text=True, check=True).stdout
    function, users = None, set()
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
        elif function and AVX512_REGISTER.search(line):
            users.add(function)
    assert any("stadapter::AVX512::" in name for name in users), "no AVX-512 code found: the copy was not built"
    outside = sorted(name for name in users if "stadapter::AVX512::" not in name and "at::vec::AVX512::" not in name)
    assert not outside, outside[:10]
