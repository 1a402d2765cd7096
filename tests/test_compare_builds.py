"""tools/compare_builds.py: another build of the kernels loads beside this checkout's under a renamed
library and namespace, computes exactly what this one does when built from the same sources, and
gets only the flags its ops' schema takes (an older build has fewer)."""

import os
import sys

import pytest
import torch

from stadapter_kernels import fused_cpp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from tools import compare_builds  # noqa: E402  (tools/ is importable from the repository root)

pytestmark = pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason=str(fused_cpp._BUILD_ERROR))

FLAGS = dict(tile_patches=0, native_gemm=True, brgemm=True, residual=True, avx512=False)


def test_an_older_schema_gets_only_the_flags_it_takes():
    library = torch.library.Library("stadapter_compare_test", "DEF")  # noqa: F841  (kept alive for the op)
    library.define("st_adapter_forward(Tensor(a!) out, Tensor x, int prefix, str activation, float scale, "
                   "int tile_patches=0, bool native_gemm=False) -> ()")
    old = torch.ops.stadapter_compare_test.st_adapter_forward
    assert compare_builds.op_flags(old, FLAGS) == dict(tile_patches=0, native_gemm=True)
    assert compare_builds.op_flags(torch.ops.stadapter_cpp.st_adapter_forward, FLAGS) == FLAGS


def test_rename_library_renames_both_macros_and_refuses_a_tree_without_them(tmp_path):
    bindings = tmp_path / "bindings.cpp"
    bindings.write_text("TORCH_LIBRARY(stadapter_cpp, m) {}\nTORCH_LIBRARY_IMPL(stadapter_cpp, CPU, m) {}\n")
    compare_builds.rename_library(str(tmp_path))
    assert bindings.read_text() == ("TORCH_LIBRARY(stadapter_other, m) {}\n"
                                    "TORCH_LIBRARY_IMPL(stadapter_other, CPU, m) {}\n")
    with pytest.raises(SystemExit, match="no TORCH_LIBRARY"):
        compare_builds.rename_library(str(tmp_path))
    with pytest.raises(SystemExit, match="bindings.cpp not found"):
        compare_builds.rename_library(str(tmp_path / "missing"))


def test_a_bad_revision_is_named():
    with pytest.raises(SystemExit, match="no-such-revision"):
        compare_builds.build_other("no-such-revision", "/nonexistent-cache")


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_this_tree_built_as_the_other_build_matches_bit_for_bit(dtype_name, other_build):
    """Same sources, same flags: every output and gradient equal, on every GEMM path this CPU has."""
    dtype = compare_builds.DTYPES[dtype_name]
    x, params = compare_builds.make_case(dtype, bottleneck=96, batch=1, seed=1)
    for native, use_brgemm in fused_cpp.available_gemm_paths(dtype, x.shape[-1], 96):
        flags = dict(FLAGS, native_gemm=native, brgemm=use_brgemm, avx512=fused_cpp.avx512)
        ours = compare_builds.runners(torch.ops.stadapter_cpp, x, params, "gelu", flags)[1]
        theirs = compare_builds.runners(other_build, x, params, "gelu", flags)[1]
        expected = [t.clone() for t in ours()]
        got = theirs()
        assert len(expected) == len(got)
        for a, b in zip(expected, got):
            assert (a is None) == (b is None)
            if a is not None:
                assert torch.equal(a, b), (dtype_name, native, use_brgemm)
        assert compare_builds.largest_difference(expected, got) == 0.0


@pytest.fixture(scope="module")
def other_build(tmp_path_factory):
    """The working tree's csrc built as stadapter_other (about a minute on two cores)."""
    path = compare_builds.build_other(ROOT, str(tmp_path_factory.mktemp("compare-builds")))
    return compare_builds.load_other(path)
