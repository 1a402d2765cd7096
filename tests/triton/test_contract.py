"""The backend contract beyond parity: what the Triton backend accepts, what autograd keeps
alive between forward and backward, deterministic gradients, how variants, configs and fp32
precision are chosen (and explained), CUDA-graph capture, grid limits and the device guard."""

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, call, make_inputs, op_kwargs
from stadapter_kernels import fused_triton
from stadapter_kernels.fused_triton import configs
from stadapter_kernels.spec import AdapterOptions, AdapterTensors, validate


def _spec(case: Case, **changes):
    case = case.with_(**changes)
    inputs = make_inputs(case, seed=0)
    return validate(*(inputs[name] for name in INPUT_NAMES[:7]), cond=inputs["cond"], **op_kwargs(case))


def test_serves_cpu_tensors_only_in_the_interpreter(monkeypatch):
    spec = _spec(Case())
    assert fused_triton.unavailable_reason(spec) is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in fused_triton.unavailable_reason(spec)


@pytest.mark.parametrize("changes, words", [
    (dict(dtype=torch.float64), "dtype"),
    (dict(kernel_hw=3, tokens=10), "spatial"),
    (dict(kernel_t=7), "kt=7"),
    (dict(bottleneck=520), "Ca=520"),
])
def test_says_why_it_cannot_serve(changes, words):
    reason = fused_triton.unavailable_reason(_spec(Case(), **changes))
    assert reason is not None and words in reason


def test_saves_no_bottleneck_for_backward():
    """Nothing of tokens x Ca elements (y, z, a) is kept between forward and backward."""
    case = Case(batch=2, frames=3, tokens=21, channels=40, bottleneck=48, cond=True)
    tokens_x_bottleneck = case.batch * case.frames * (case.tokens - case.prefix) * case.bottleneck
    inputs = {n: (t.requires_grad_() if t is not None else None) for n, t in make_inputs(case, seed=1).items()}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = call(sk.st_adapter, inputs, case, backend="triton")
    assert saved, "the hook saw nothing: the op's autograd did not run"
    assert inputs["x"].numel() < tokens_x_bottleneck  # so x itself cannot be mistaken for a bottleneck
    too_big = [tuple(t.shape) for t in saved if t.numel() >= tokens_x_bottleneck]
    assert not too_big, f"tensors of >= tokens x Ca elements saved for backward: {too_big}"
    out.sum().backward()
    assert inputs["x"].grad is not None


def test_gradients_are_deterministic():
    case = Case(batch=2, frames=3, tokens=38, bottleneck=24, cond=True, dtype=torch.bfloat16)
    inputs = make_inputs(case, seed=2)
    grad_out = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(3)).to(case.dtype)

    def gradients():
        leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items() if t is not None}
        out = call(sk.st_adapter, {n: leaves.get(n) for n in INPUT_NAMES}, case, backend="triton")
        return torch.autograd.grad(out, list(leaves.values()), grad_out)

    for first, second in zip(gradients(), gradients()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("setting, precision", [("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")])
def test_float32_dots_follow_torch_setting_and_explain_says_so(setting, precision):
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(setting)
    try:
        assert configs.dot_precision(torch.float32) == precision
        explanation = sk.explain(*(make_inputs(Case(), seed=0)[n] for n in INPUT_NAMES[:7]), **op_kwargs(Case()),
                                 backend="triton")
    finally:
        torch.set_float32_matmul_precision(previous)
    assert f"float32 dots as {precision}" in str(explanation)
    assert "variant fused" in str(explanation)


def test_explain_names_the_forced_variant():
    with configs.forced(variant="two_gemm"):
        assert "variant two_gemm" in fused_triton.describe(_spec(Case(dtype=torch.bfloat16)))


def test_forcing_checks_its_arguments(monkeypatch):
    with pytest.raises(ValueError, match="variant"):
        with configs.forced(variant="three_gemm"):
            pass
    with pytest.raises(ValueError, match="unknown kernel"):
        with configs.forced(forwards="p32_c32_w8_s2_r255"):
            pass
    with configs.forced(forward="p99"), pytest.raises(ValueError, match="not shipped for forward"):
        configs.configs_for("forward", 24)
    monkeypatch.setenv(configs.ENV_CONFIG, "forward")
    with pytest.raises(ValueError, match=configs.ENV_CONFIG):
        configs.configs_for("forward", 24)


def test_environment_forces_variant_and_config_and_the_context_manager_wins(monkeypatch):
    monkeypatch.setenv(configs.ENV_VARIANT, "two_gemm")
    name = configs.SHIPPED[("up_gemm", 32)][1].name
    monkeypatch.setenv(configs.ENV_CONFIG, f"up_gemm={name}")
    assert configs.variant_for(torch.device("cpu")) == "two_gemm"
    assert configs.configs_for("up_gemm", 24) == (configs.SHIPPED[("up_gemm", 32)][1],)
    with configs.forced(variant="fused"):
        assert configs.variant_for(torch.device("cpu")) == "fused"


def test_auto_variant_reads_the_device_table(monkeypatch):
    assert configs.auto_variant("NVIDIA H200") == configs.DEFAULT_VARIANT
    monkeypatch.setitem(configs.AUTO_VARIANT, "NVIDIA H200", "two_gemm")
    assert configs.auto_variant("NVIDIA H200") == "two_gemm"


def test_shipped_lists_every_config_of_every_variant():
    rows = configs.shipped()
    assert {row.variant for row in rows} == set(configs.VARIANTS)
    for variant in configs.VARIANTS:
        assert {row.kernel for row in configs.shipped(variant)} == set(configs.VARIANT_KERNELS[variant])
    assert len(rows) == sum(len(c) for (kernel, _), c in configs.SHIPPED.items() for variant in configs.VARIANTS
                            if kernel in configs.VARIANT_KERNELS[variant])


def test_capture_launches_a_known_config_without_autotuning(monkeypatch):
    """Under CUDA-graph capture: the config autotuning chose earlier for the key, else the first."""
    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the full shipped lists
    shipped = configs.SHIPPED[("forward", 32)]
    assert fused_triton.select_config("forward", 24, key=("k",), capturing=False) is None  # autotunes
    assert fused_triton.select_config("forward", 24, key=("k",), capturing=True) == shipped[0]
    monkeypatch.setitem(fused_triton._CHOSEN, ("forward", ("k",)), shipped[1])
    assert fused_triton.select_config("forward", 24, key=("k",), capturing=True) == shipped[1]
    with configs.forced(forward=shipped[1].name):
        assert fused_triton.select_config("forward", 24, key=("other",), capturing=False) == shipped[1]


def test_every_grid_is_one_dimensional_and_within_cuda_limits():
    """B x T far past 65,535 (the cap of grid y and z): every launch is a 1-D grid under 2^31."""
    case = Case(batch=70_000, frames=2, tokens=38, channels=40, bottleneck=24, cond=True)
    meta = torch.device("meta")
    x = torch.empty((case.batch, case.frames, case.tokens, case.channels), device=meta)
    inputs = make_inputs(Case(batch=1, tokens=38, cond=True), seed=0)
    params = AdapterTensors(*(inputs[n].to(meta) for n in INPUT_NAMES[1:7]), torch.empty((case.batch, 24), device=meta))
    options = AdapterOptions(prefix=1, activation="gelu", scale=0.5)
    for variant in configs.VARIANTS:
        with configs.forced(variant=variant):
            launches = fused_triton.forward_launches(torch.empty_like(x), x, params, options)
            launches += fused_triton.backward_launches(torch.empty_like(x), torch.empty_like(x), x, params,
                                                       options)[0]
        for launch in launches:
            for config in configs.SHIPPED[(launch.kernel, configs.ca_pad(24))]:
                programs = launch.grid(config)
                assert isinstance(programs, int) and 1 <= programs <= fused_triton.MAX_GRID_X
    with pytest.raises(ValueError, match="grid limit"):
        fused_triton._checked_grid("forward", fused_triton.MAX_GRID_X + 1)


def test_launches_enter_the_device_of_x():
    guard = fused_triton._device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.parametrize("batch, kernel_t, expected", [
    (1, 3, 1),  # batch 1 (7 tiles of 32 patches): every frame its own item fills 56 programs
    (1, 1, 1),  # kt = 1 has no halo: each frame its own item
    (8, 3, 4),  # 56 tiles: two chunks of 4 frames fill 112 of 132 programs in one wave
    (32, 3, 8),  # 224 tiles already fill the GPU: one chunk, no halo re-projection
])
def test_chunk_length_from_shape_and_programs(batch, kernel_t, expected):
    assert fused_triton.frames_per_chunk(batch, 8, 196, kernel_t, programs=132) == expected
