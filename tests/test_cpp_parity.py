"""The C++ CPU backend against the float64 oracle: output and every gradient on edge shapes
(partial and multiple tiles, T = 1, T < kt, prefixes, layouts, bottlenecks, activations, cond,
scale, dtypes), with NaN-poisoned allocations so an unwritten element fails."""

import itertools

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, TOLERANCE, Case, assert_matches_oracle, call, make_inputs, rel_error
from stadapter_kernels import fused_cpp
from stadapter_kernels.reference import oracle
from test_cpp_gemm_paths import force_gemm_path, with_gemm_paths

pytestmark = pytest.mark.skipif(fused_cpp._BUILD_ERROR is not None, reason=str(fused_cpp._BUILD_ERROR))

BASE = Case()  # B=2, T=3, L=11 (prefix 1: P=10), C=40, Ca=24, gelu, scale 0.5

# (case, patch rows per tile): tile 3 splits P=10 into 3+3+3+1 (a partial last tile, 8 tiles:
# 8 reduction groups), tile 4 into 4+4+2; 0 is the kernel's own choice (one tile per frame here).
GRID = (
    [(BASE, tile) for tile in (0, 1, 3, 4, 10, 16)]
    + [(BASE.with_(layout=layout, prefix=prefix, tokens=prefix + 7), 3)
       for layout, prefix in itertools.product(sk.LAYOUTS, (0, 1, 5))]
    + [(BASE.with_(frames=frames, kernel_t=kt), 3)
       for frames, kt in ((1, 1), (1, 3), (1, 5), (2, 5), (3, 3), (8, 3), (4, 5), (5, 1))]
    + [(BASE.with_(activation=activation), 3) for activation in sk.ACTIVATIONS]
    + [(BASE.with_(activation=activation, dtype=torch.bfloat16), 3) for activation in sk.ACTIVATIONS]
    # 11 frames: the native backward's weight gradients in chunks of 8 + 3 frames
    + [(BASE.with_(frames=11, dtype=torch.bfloat16, cond=True), 0)]
    # whole-frame tiles of 88 patches x Ca = 384: the native forward's GEMMs take 3 frames at once
    # (frames 0-2, 3-5, 6-8, 9-10)
    + [(Case(frames=11, tokens=89, channels=16, bottleneck=384, dtype=torch.bfloat16, cond=True), 0)]
    + [(BASE.with_(cond=True), 3), (BASE.with_(biases=False, cond=True, scale=2.0), 4),
       (BASE.with_(biases=False), 0)]
    + [(BASE.with_(bottleneck=ca, channels=c), 3) for ca, c in ((24, 40), (48, 40), (384, 40), (20, 13), (48, 64))]
    + [(BASE.with_(dtype=dtype, layout=layout, cond=True), 3)
       for dtype in (torch.bfloat16, torch.float16) for layout in sk.LAYOUTS]
    # 8 reduction groups of (Ca x C) float32 partials, twice: 34 MB, past the per-thread arena cap,
    # so the backward's partials take the per-call allocation path.
    + [(Case(batch=8, frames=1, tokens=2, channels=1024, bottleneck=520), 0)]
    # ViT-like frame (14 x 14 patches + class token), the kernel's own tiling: one clip gets two tiles
    # per frame, two clips one each.
    + [(Case(batch=1, frames=4, tokens=197, channels=64, bottleneck=48, activation="identity"), 0),
       (Case(batch=2, frames=2, tokens=197, channels=40, bottleneck=24, dtype=torch.bfloat16, cond=True), 0)]
    # widths that are multiples of 16: 16-bit brgemm takes these where the CPU has it (AMX)
    + [(Case(frames=5, tokens=17, channels=64, bottleneck=32, dtype=dtype, cond=True), tile)
       for dtype in (torch.bfloat16, torch.float16) for tile in (0, 5)]
    + [(Case(frames=3, tokens=50, channels=96, bottleneck=80, dtype=torch.bfloat16, activation="relu"), 0)]
    # residual=False: the branch alone on patch tokens, zero on prefix tokens, dx without grad_out
    + [(BASE.with_(residual=False, dtype=dtype, cond=True), tile)
       for dtype in (torch.float32, torch.bfloat16, torch.float16) for tile in (0, 3)]
    + [(BASE.with_(residual=False, layout=layout, prefix=prefix, tokens=prefix + 7), 4)
       for layout, prefix in itertools.product(sk.LAYOUTS, (0, 5))]
    + [(BASE.with_(residual=False, frames=1, kernel_t=3, biases=False, activation="relu"), 3),
       (Case(residual=False, frames=5, tokens=17, channels=64, bottleneck=32, dtype=torch.bfloat16), 0)]
)


# Every case on every GEMM path this CPU has (test_cpp_gemm_paths.with_gemm_paths): float32 on MKL
# and brgemm; bfloat16/float16 also widened to float32 (both), native oneDNN, and brgemm on AMX.
GEMM_GRID = with_gemm_paths(GRID)


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", GEMM_GRID, ids=lambda v: str(v))
def test_cpp_matches_oracle(case, tile, native_gemm, brgemm, monkeypatch):
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    assert_matches_oracle(case, backend="cpp")


# On an AVX-512 CPU the kernels' default copy is the AVX-512 one (fused_cpp.avx512), which the test
# above runs; this one runs the AVX2 copy, as AVX2-only CPUs do, on every GEMM path too. On an
# AVX2-only CPU the AVX2 copy is the default, so the test above already runs it: one skip says so.
AVX2_COPY_GRID = GEMM_GRID if fused_cpp.avx512 else [pytest.param(
    None, None, None, None, id="avx2-only-cpu",
    marks=pytest.mark.skip(reason="AVX2-only CPU: test_cpp_matches_oracle already runs the AVX2 copy"))]


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", AVX2_COPY_GRID, ids=lambda v: str(v))
def test_cpp_avx2_copy_matches_oracle_on_an_avx512_cpu(case, tile, native_gemm, brgemm, monkeypatch):
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    monkeypatch.setattr(fused_cpp, "avx512", False)
    assert_matches_oracle(case, backend="cpp")


def test_auto_picks_cpp_for_cpu_tensors():
    choice = call(sk.explain, make_inputs(BASE, seed=0), BASE)
    assert choice.backend == "cpp", str(choice)


@pytest.mark.parametrize("layout", sk.LAYOUTS)
def test_every_element_of_out_and_dx_is_written(layout):
    """The ops write through the strides of NaN-filled views: a skipped row or channel stays NaN."""
    case = BASE.with_(layout=layout, cond=True)
    inputs = make_inputs(case, seed=1)
    x4 = sk.spec.as_btlc(inputs["x"], layout, case.frames)
    params = [inputs[name] for name in ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight",
                                        "fc2_bias", "cond")]
    options = (case.prefix, case.activation, case.scale, 3)
    out = sk.spec.as_btlc(torch.full_like(inputs["x"], float("nan")), layout, case.frames)
    torch.ops.stadapter_cpp.st_adapter_forward(out, x4, *params, *options)
    assert torch.isfinite(out).all()
    dx = sk.spec.as_btlc(torch.full_like(inputs["x"], float("nan")), layout, case.frames)
    grads = torch.ops.stadapter_cpp.st_adapter_backward(dx, torch.randn_like(x4), x4, *params, *options)
    assert torch.isfinite(dx).all() and all(torch.isfinite(g).all() for g in grads)


def test_poisoning_catches_an_unwritten_element_of_the_cpp_output(monkeypatch):
    """The harness fails the cpp backend if one element of its output is left unwritten."""
    original = fused_cpp.forward

    def forgetful_forward(out, x, params, options):
        original(out, x, params, options)
        out[-1, -1, -1, -1] = torch.empty((), dtype=out.dtype)  # NaN under the harness's poisoning

    monkeypatch.setattr(fused_cpp, "forward", forgetful_forward)
    with pytest.raises(AssertionError, match="out"):
        assert_matches_oracle(BASE, backend="cpp")


def test_compile_fullgraph_with_the_cpp_backend():
    torch._dynamo.reset()
    case = BASE.with_(cond=True)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case, seed=2).items() if v is not None}

    def adapter(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond):
        return sk.st_adapter(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond=cond,
                             num_frames=case.frames, activation="gelu", backend="cpp").square().sum()

    eager = adapter(**inputs)
    eager_grads = torch.autograd.grad(eager, list(inputs.values()))
    compiled = torch.compile(adapter, fullgraph=True, backend="aot_eager")(**inputs)
    compiled_grads = torch.autograd.grad(compiled, list(inputs.values()))
    assert torch.equal(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads):
        assert torch.equal(c, e)


# Every GEMM path: brgemm and MKL's frame-by-frame weight gradients (whole 196-patch frames as tiles,
# widths AMX takes) take rows that must not overlap.
BROADCAST_GRID = with_gemm_paths([(BASE.with_(cond=True), 0),
                                  (BASE.with_(cond=True, tokens=197, channels=32, bottleneck=48,
                                              dtype=torch.bfloat16), 0)])


@pytest.mark.parametrize("case, tile, native_gemm, brgemm", BROADCAST_GRID, ids=str)
def test_broadcast_grad_out_with_zero_row_strides(case, tile, native_gemm, brgemm, monkeypatch):
    """grad_out w expanded over (B*T, L): row strides 0, channel stride 1, as autograd hands an
    expanded grad_outputs to the op (checked below: the kernel sees those strides)."""
    force_gemm_path(monkeypatch, case.dtype, tile, native_gemm, brgemm)
    inputs = make_inputs(case, seed=4)
    weight = torch.randn(case.channels, dtype=torch.float64)

    def gradients(fn, cast):
        leaves = [cast(inputs[n]).requires_grad_() for n in INPUT_NAMES if inputs[n] is not None]
        named = dict(zip([n for n in INPUT_NAMES if inputs[n] is not None], leaves))
        extra = {"backend": "cpp"} if fn is sk.st_adapter else {}
        out = call(fn, {n: named.get(n) for n in INPUT_NAMES}, case, **extra)
        return torch.autograd.grad(out, leaves, weight.to(out.dtype).expand(out.shape))

    seen_strides = []
    backward = fused_cpp.backward

    def recording_backward(dx, grad_out, *rest):
        seen_strides.append(grad_out.stride())
        return backward(dx, grad_out, *rest)

    monkeypatch.setattr(fused_cpp, "backward", recording_backward)
    actual = gradients(sk.st_adapter, lambda t: t.detach().clone())
    assert seen_strides and seen_strides[0][:-1] == (0,) * (len(seen_strides[0]) - 1)
    expected = gradients(oracle, lambda t: t.detach().double())
    for a, e in zip(actual, expected):
        assert rel_error(a, e) <= TOLERANCE[case.dtype]
