"""The fused Triton backend of `stadapter::st_adapter` (the backend contract of dispatch.py).

Two variants (`configs.VARIANTS`, chosen per call by `configs.variant_for`):

- "fused": the forward is one kernel (forward.py); the backward launches four (backward.py).
- "two_gemm": the forward is a plain GEMM writing y, then the up-projection GEMM with the conv
  and activation in its prologue; the backward likewise (two_gemm.py).

Both keep nothing of the forward but x. Kernels are launched through
`torch.library.wrap_triton`, so torch.compile sees them inside the op's `triton_op`, on x's
device. Autotuning is keyed on (C, Ca, kt) and the dtypes of the tensor arguments, over the
configs of `configs.SHIPPED`, which all give the same bits; a forced config
(`configs.forced`) or a launch under CUDA-graph capture runs one config without benchmarking.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from ..spec import AdapterOptions, AdapterSpec, AdapterTensors
from . import configs
from .backward import (st_adapter_backward_bottleneck_kernel, st_adapter_backward_input_kernel,
                       token_outer_product_kernel)
from .common import ACTIVATION_IDS, MAX_KERNEL_T
from .forward import st_adapter_forward_kernel
from .two_gemm import down_gemm_kernel, dz_gemm_kernel, up_gemm_kernel

__all__ = ["backward", "describe", "forward", "unavailable_reason"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS = {
    "forward": st_adapter_forward_kernel,
    "backward_bottleneck": st_adapter_backward_bottleneck_kernel,
    "backward_input": st_adapter_backward_input_kernel,
    "down_gemm": down_gemm_kernel,
    "up_gemm": up_gemm_kernel,
    "dz_gemm": dz_gemm_kernel,
}
#: The kernels with a persistent grid (programs sized by occupancy, work items looped over).
_PERSISTENT = ("forward", "backward_bottleneck")
#: Programs a split-K weight-gradient launch aims for (about two waves on an H100's 132 SMs).
_OUTER_PRODUCT_PROGRAMS = 264
#: CUDA's cap on grid dimension x; every launch here is a 1-D grid (y and z stop at 65,535).
MAX_GRID_X = 2**31 - 1


def unavailable_reason(spec: AdapterSpec) -> str | None:
    """None when the fused Triton kernels can serve this call, else why not."""
    if spec.device.type == "cpu" and not configs.interpreting():
        return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)"
    if spec.device.type not in ("cuda", "cpu"):
        return f"Triton kernels run on CUDA tensors, got {spec.device.type}"
    if spec.dtype not in _DTYPES:
        return f"dtype {spec.dtype} is not supported (float16, bfloat16 or float32)"
    if spec.spatial:
        return f"a spatial conv kernel {spec.kernel_hw} is not fused (temporal (kt, 1, 1) only)"
    if spec.kernel_t > MAX_KERNEL_T:
        return f"temporal kernel kt={spec.kernel_t} is larger than the fused maximum {MAX_KERNEL_T}"
    if spec.bottleneck > configs.MAX_BOTTLENECK:
        return f"bottleneck Ca={spec.bottleneck} is larger than the fused maximum {configs.MAX_BOTTLENECK}"
    return None


def describe(spec: AdapterSpec) -> str:
    """The variant this call runs and, for float32, how its dots run (explain shows it)."""
    variant = configs.variant_for(spec.device)
    note = f"variant {variant} ({', '.join(configs.VARIANT_KERNELS[variant])})"
    if spec.dtype == torch.float32:
        precision = configs.dot_precision(torch.float32)
        setting = torch.get_float32_matmul_precision()
        accuracy = "about float32 accuracy" if precision != "tf32" else "tf32 accuracy, DESIGN.md's 5e-4"
        note += (f"; float32 dots as {precision} (torch.get_float32_matmul_precision() is {setting!r}: "
                 f"{accuracy})")
    return note


# --- choosing and launching a config --------------------------------------------------------

@functools.cache
def _tuned(kernel: str, config_list: tuple[configs.TileConfig, ...]):
    """The autotuned kernel over these configs. Every kernel writes all of its outputs on every
    launch, so benchmarking configs on the real arguments leaves nothing stale behind."""
    return triton.autotune(configs=[c.triton_config() for c in config_list], key=["C", "CA", "KT"])(_KERNELS[kernel])


#: The config autotuning chose per (kernel, autotune key): what a launch under CUDA-graph
#: capture reuses (benchmarking inside a capture would record the benchmark).
_CHOSEN: dict[tuple, configs.TileConfig] = {}


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def select_config(kernel: str, bottleneck: int, key: tuple, capturing: bool) -> configs.TileConfig | None:
    """The one config to launch without autotuning, or None to autotune: a forced config; under
    capture the config autotuning chose for this key before, else the first shipped one (all
    give the same bits); a single candidate."""
    candidates = configs.configs_for(kernel, bottleneck)
    if len(candidates) == 1:
        return candidates[0]
    if capturing:
        return _CHOSEN.get((kernel, key), candidates[0])
    return None


def _config_of(kernel: str, bottleneck: int, meta: dict) -> configs.TileConfig:
    """The config a launch's meta-parameters belong to (persistent kernels' configs differ in
    (BLOCK_P, BLOCK_C), see `_check_persistent_configs`)."""
    for config in configs.configs_for(kernel, bottleneck):
        if (config.block_p, config.block_c) == (meta["BLOCK_P"], meta["BLOCK_C"]):
            return config
    raise AssertionError(f"no shipped {kernel} config with {meta['BLOCK_P']=}, {meta['BLOCK_C']=}")


def _check_persistent_configs() -> None:
    for (kernel, ca_pad), tile_configs in configs.SHIPPED.items():
        tiles = [(c.block_p, c.block_c) for c in tile_configs]
        if kernel in _PERSISTENT and len(set(tiles)) != len(tiles):
            raise AssertionError(f"{kernel} at CA_PAD {ca_pad}: configs must differ in (block_p, block_c)")


_check_persistent_configs()


@dataclass
class Launch:
    """One kernel launch as the launcher makes it: what `inspect` compiles too."""

    kernel: str
    bottleneck: int
    args: tuple
    constexprs: dict
    grid: Callable[[configs.TileConfig], int]  # programs for a config

    def run(self, device: torch.device) -> None:
        fn = _KERNELS[self.kernel]
        key = (self.constexprs.get("KT"), self.args[fn.arg_names.index("C")], self.args[fn.arg_names.index("CA")],
               *(str(a.dtype) for a in self.args if isinstance(a, torch.Tensor)))
        config = select_config(self.kernel, self.bottleneck, key, _capturing(device))
        if config is not None:
            programs = _checked_grid(self.kernel, self.grid(config))
            torch.library.wrap_triton(fn)[(programs,)](*self.args, **self.constexprs, **config.launch_options())
            return
        tuned = _tuned(self.kernel, configs.configs_for(self.kernel, self.bottleneck))

        def grid(meta):
            return (_checked_grid(self.kernel, self.grid(_config_of(self.kernel, self.bottleneck, meta))),)

        torch.library.wrap_triton(tuned)[grid](*self.args, **self.constexprs)
        chosen = getattr(tuned, "best_config", None)
        if chosen is not None:
            _CHOSEN[(self.kernel, key)] = _config_of(self.kernel, self.bottleneck, chosen.kwargs)


def _checked_grid(kernel: str, programs: int) -> int:
    if not 1 <= programs <= MAX_GRID_X:
        raise ValueError(f"{kernel}: {programs} programs is outside CUDA's grid limit (1 .. {MAX_GRID_X}); "
                         "split the call over the batch")
    return programs


def _device_guard(device: torch.device):
    """Launch on x's device, not the current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


# --- shapes shared by the launches ------------------------------------------------------------

def _constexprs(params: AdapterTensors, options: AdapterOptions) -> dict:
    return dict(
        KT=params.conv_weight.shape[2], CA_PAD=configs.ca_pad(params.fc1_weight.shape[0]),
        ACTIVATION=ACTIVATION_IDS[options.activation], RESIDUAL=options.residual,
        HAS_B_DOWN=params.fc1_bias is not None, HAS_B_CONV=params.conv_bias is not None,
        HAS_COND=params.cond is not None,
        DOT_PRECISION=configs.dot_precision(params.fc1_weight.dtype),
        BLOCK_A=configs.block_a(params.fc1_weight.shape[0], params.fc1_weight.dtype),
    )


def _weights(params: AdapterTensors):
    """Contiguous parameters (small) and a placeholder for each absent one."""
    w_down = params.fc1_weight.contiguous()

    def given(t):
        return w_down if t is None else t.contiguous()
    return (w_down, given(params.fc1_bias), params.conv_weight.reshape(params.conv_weight.shape[0], -1).contiguous(),
            given(params.conv_bias), params.fc2_weight.contiguous(), given(params.fc2_bias), given(params.cond))


def _sm_programs(config: configs.TileConfig, device: torch.device) -> int:
    """Programs of a persistent launch of `config`: as many as fit on the GPU at once
    (occupancy by registers x threads); few in the interpreter, so its tests also cover programs
    that take several work items."""
    if device.type != "cuda":
        return configs.INTERPRETER_PROGRAMS
    properties = torch.cuda.get_device_properties(device)
    return properties.multi_processor_count * configs.programs_per_sm(config,
                                                                     properties.max_threads_per_multi_processor)


def frames_per_chunk(batch: int, frames: int, patches: int, kernel_t: int, programs: int) -> int:
    """Frames per work item of the persistent kernels, from the shape and the programs that fit.

    More chunks fill more programs but each re-projects kt - 1 halo frames, so this picks the
    chunk count with the least modelled time: waves of work items x per-item cost (2 GEMM
    frames per frame, 1 per halo frame), fewer chunks on a tie. Any choice gives the same bits.
    """
    forced = configs.forced_frames_per_chunk()
    if forced is not None:
        return min(forced, frames)
    tiles = batch * triton.cdiv(patches, max(c.block_p for c in configs.SHIPPED[("forward", 16)]))
    best = None
    for chunks in range(1, frames + 1):
        length = triton.cdiv(frames, chunks)
        cost = triton.cdiv(tiles * triton.cdiv(frames, length), programs) * (2 * length + kernel_t - 1)
        if best is None or cost < best[0]:
            best = (cost, length)
    return best[1]


class _Persistent:
    """Grid and scratch of a persistent kernel: programs by occupancy; each program's scratch
    is `tiles` bottleneck tiles of its config's BLOCK_P, so the buffer is sized for the config
    whose programs x BLOCK_P is largest, and each config touches all of what it needs only."""

    def __init__(self, kernel: str, bottleneck: int, device: torch.device, items: Callable[[int], int]):
        self.kernel, self.bottleneck, self.device, self.items = kernel, bottleneck, device, items
        self.candidates = configs.configs_for(kernel, bottleneck)
        self.programs = max(_sm_programs(c, device) for c in self.candidates)

    def grid(self, config: configs.TileConfig) -> int:
        return min(_sm_programs(config, self.device), self.items(config.block_p))

    def scratch(self, tiles: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(scratch_elements(self.candidates, tiles, self.bottleneck, self.device), dtype=dtype,
                           device=self.device)


def scratch_elements(candidates, tiles: int, bottleneck: int, device: torch.device) -> int:
    """Elements of a persistent kernel's scratch: `tiles` (BLOCK_P, CA_PAD) tiles per program,
    for the candidate config with the most programs x BLOCK_P (tools/model_h100.py models it)."""
    return max(_sm_programs(c, device) * c.block_p for c in candidates) * tiles * configs.ca_pad(bottleneck)


def _groups(patches: int) -> int:
    """Partial-sum rows per frame: one per configs.ROW_GROUP patch rows."""
    return triton.cdiv(patches, configs.ROW_GROUP)


# --- forward ------------------------------------------------------------------------------------

def forward(out: torch.Tensor, x: torch.Tensor, params: AdapterTensors, options: AdapterOptions) -> None:
    """Write the adapter's output into `out`; both are strided (B, T, L, C) views."""
    with _device_guard(x.device):
        for launch in forward_launches(out, x, params, options):
            launch.run(x.device)


def forward_launches(out, x, params: AdapterTensors, options: AdapterOptions) -> list[Launch]:
    """The launches of one forward call, in order (allocating their scratch)."""
    if configs.variant_for(x.device) == "two_gemm":
        return _two_gemm_forward(out, x, params, options)
    batch, frames, _, channels = x.shape
    bottleneck, kernel_t = params.fc1_weight.shape[0], params.conv_weight.shape[2]
    prefix = options.prefix
    patches = x.shape[2] - prefix
    w_down, b_down, w_conv, b_conv, w_up, b_up, cond = _weights(params)
    constexprs = _constexprs(params, options)
    persistent = _Persistent("forward", bottleneck, x.device, lambda block_p: batch * (
        triton.cdiv(prefix, block_p) + chunks * triton.cdiv(patches, block_p)))
    length = frames_per_chunk(batch, frames, patches, kernel_t, persistent.programs)
    chunks = triton.cdiv(frames, length)
    # The ring of kt bottleneck tiles and the activated tile.
    scratch = persistent.scratch(kernel_t + 1, configs.ring_dtype("forward", options.activation, x.dtype))
    args = (x, out, w_down, b_down, w_conv, b_conv, w_up, b_up, cond, scratch,
            batch, frames, patches, channels, bottleneck, prefix, length,
            *x.stride()[:3], *out.stride()[:3], float(options.scale))
    return [Launch("forward", bottleneck, args, dict(HAS_B_UP=params.fc2_bias is not None, **constexprs),
                   persistent.grid)]


def _two_gemm_forward(out, x, params: AdapterTensors, options: AdapterOptions) -> list[Launch]:
    batch, frames, _, channels = x.shape
    bottleneck = params.fc1_weight.shape[0]
    prefix = options.prefix
    patches = x.shape[2] - prefix
    w_down, b_down, w_conv, b_conv, w_up, b_up, cond = _weights(params)
    constexprs = _constexprs(params, options)
    y = torch.empty((batch, frames, patches, bottleneck), device=x.device,
                    dtype=configs.ring_dtype("down_gemm", options.activation, x.dtype))
    return [_down_launch(x, y, params, options, w_down, b_down, cond, constexprs),
            Launch("up_gemm", bottleneck,
                   (x, out, y, w_conv, b_conv, w_up, b_up, frames, patches, channels, bottleneck, prefix,
                    *x.stride()[:3], *out.stride()[:3], float(options.scale)),
                   dict(HAS_B_UP=params.fc2_bias is not None,
                        **{k: constexprs[k] for k in ("KT", "ACTIVATION", "HAS_B_CONV", "RESIDUAL", "DOT_PRECISION",
                                                       "BLOCK_A")}),
                   lambda c: batch * frames * (triton.cdiv(prefix, c.block_p) + triton.cdiv(patches, c.block_p))
                   * triton.cdiv(channels, c.block_c))]


def _down_launch(x, y, params, options, w_down, b_down, cond, constexprs) -> Launch:
    """K1 of the two-GEMM variant: y = x_p @ w_down.T + b_down + cond, one program per
    (video, frame, patch tile, BLOCK_A columns of Ca)."""
    batch, frames, _, channels = x.shape
    bottleneck = params.fc1_weight.shape[0]
    patches = x.shape[2] - options.prefix
    return Launch("down_gemm", bottleneck,
                  (x, y, w_down, b_down, cond, frames, patches, channels, bottleneck, options.prefix,
                   *x.stride()[:3]),
                  {k: constexprs[k] for k in ("HAS_B_DOWN", "HAS_COND", "DOT_PRECISION", "BLOCK_A")},
                  lambda c: batch * frames * triton.cdiv(patches, c.block_p)
                  * triton.cdiv(bottleneck, constexprs["BLOCK_A"]))


# --- backward -----------------------------------------------------------------------------------

def backward(dx: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, params: AdapterTensors,
             options: AdapterOptions) -> AdapterTensors:
    """Write dL/dx into `dx` and return every parameter gradient; see backward.py."""
    with _device_guard(x.device):
        return _backward(dx, grad_out, x, params, options)


def backward_launches(dx, grad_out, x, params: AdapterTensors, options: AdapterOptions):
    """(launches before the weight gradients, the transient buffers they write): a dict with
    a_buf, dz_buf, dy_buf, conv_partial, dy_partial, grad_partial."""
    batch, frames, _, channels = x.shape
    bottleneck, kernel_t = params.fc1_weight.shape[0], params.conv_weight.shape[2]
    prefix = options.prefix
    patches = x.shape[2] - prefix
    dtype, device = x.dtype, x.device
    w_down, b_down, w_conv, b_conv, w_up, _, cond = _weights(params)
    constexprs = _constexprs(params, options)
    groups = _groups(patches)

    # Transient (tokens x Ca) buffers and per-16-row partial sums; they die with this call.
    buffers = dict(
        a_buf=torch.empty((batch, frames, patches, bottleneck), dtype=dtype, device=device),
        dz_buf=torch.empty((batch, frames, patches, bottleneck), dtype=torch.float32, device=device),
        dy_buf=torch.empty((batch, frames, patches, bottleneck), dtype=dtype, device=device),
        conv_partial=torch.empty((batch * frames * groups, kernel_t + 1, bottleneck), dtype=torch.float32,
                                 device=device),
        dy_partial=torch.empty((batch, frames * groups, bottleneck), dtype=torch.float32, device=device),
        grad_partial=torch.empty((batch * frames * groups, channels), dtype=torch.float32, device=device),
    )
    launches = []
    if configs.variant_for(device) == "two_gemm":
        y = torch.empty((batch, frames, patches, bottleneck), device=device,
                        dtype=configs.ring_dtype("dz_gemm", options.activation, dtype))
        launches.append(_down_launch(x, y, params, options, w_down, b_down, cond, constexprs))
        launches.append(Launch(
            "dz_gemm", bottleneck,
            (grad_out, y, w_conv, b_conv, w_up, buffers["a_buf"], buffers["dz_buf"], buffers["conv_partial"],
             frames, patches, channels, bottleneck, prefix, *grad_out.stride()[:3], float(options.scale)),
            {k: constexprs[k] for k in ("KT", "ACTIVATION", "HAS_B_CONV", "DOT_PRECISION", "BLOCK_A")},
            lambda c: batch * frames * triton.cdiv(patches, c.block_p) * triton.cdiv(bottleneck, constexprs["BLOCK_A"])))
    else:
        persistent = _Persistent("backward_bottleneck", bottleneck, device,
                                 lambda block_p: batch * chunks * triton.cdiv(patches, block_p))
        length = frames_per_chunk(batch, frames, patches, kernel_t, persistent.programs)
        chunks = triton.cdiv(frames, length)
        scratch = persistent.scratch(kernel_t, configs.ring_dtype("backward_bottleneck", options.activation, dtype))
        launches.append(Launch(
            "backward_bottleneck", bottleneck,
            (x, grad_out, w_down, b_down, w_conv, b_conv, w_up, cond,
             buffers["a_buf"], buffers["dz_buf"], buffers["conv_partial"], scratch,
             batch, frames, patches, channels, bottleneck, prefix, length,
             *x.stride()[:3], *grad_out.stride()[:3], float(options.scale)),
            # residual only changes dx (backward_input): the branch's gradients are the same
            {k: v for k, v in constexprs.items() if k != "RESIDUAL"}, persistent.grid))
    launches.append(Launch(
        "backward_input", bottleneck,
        (grad_out, dx, w_down, w_conv, buffers["dz_buf"], buffers["dy_buf"], buffers["dy_partial"],
         buffers["grad_partial"], frames, patches, channels, bottleneck, prefix,
         *grad_out.stride()[:3], *dx.stride()[:3]),
        {k: constexprs[k] for k in ("KT", "CA_PAD", "RESIDUAL", "DOT_PRECISION", "BLOCK_A")},
        lambda c: batch * frames * (triton.cdiv(prefix, c.block_p) + triton.cdiv(patches, c.block_p))))
    return launches, buffers


def _backward(dx, grad_out, x, params: AdapterTensors, options: AdapterOptions) -> AdapterTensors:
    dtype = x.dtype
    kernel_t = params.conv_weight.shape[2]
    prefix = options.prefix
    launches, buffers = backward_launches(dx, grad_out, x, params, options)
    for launch in launches:
        launch.run(x.device)
    d_up_weight = _token_outer_product(grad_out, buffers["a_buf"], prefix) * options.scale
    d_down_weight = _token_outer_product(x, buffers["dy_buf"], prefix).T

    conv_sums = buffers["conv_partial"].sum(0)  # (kt + 1, Ca)
    dy_sums = buffers["dy_partial"].sum(1)  # (B, Ca)
    return AdapterTensors(
        d_down_weight.to(dtype), dy_sums.sum(0).to(dtype),
        # copy=True: both conv gradients are views of conv_sums, and op outputs must not alias.
        conv_sums[:kernel_t].T.reshape(params.conv_weight.shape).to(dtype, copy=True),
        conv_sums[kernel_t].to(dtype, copy=True),
        d_up_weight.to(dtype), (buffers["grad_partial"].sum(0) * options.scale).to(dtype), dy_sums.to(dtype),
    )


def outer_product_splits(count: int, channels: int, bottleneck: int, element_size: int) -> tuple[int, int]:
    """(splits, tokens per split) of the weight-gradient GEMM: enough splits to fill the GPU,
    each a whole number of BLOCK_N steps; a function of the shape only, so the reduction order
    (and the result) never changes between calls."""
    config = configs.OUTER_PRODUCT[element_size]
    tiles = triton.cdiv(channels, config.block_c) * triton.cdiv(bottleneck, config.block_a)
    splits = max(1, min(triton.cdiv(count, config.block_n), triton.cdiv(_OUTER_PRODUCT_PROGRAMS, tiles)))
    tokens_per_split = triton.cdiv(triton.cdiv(count, splits), config.block_n) * config.block_n
    return triton.cdiv(count, tokens_per_split), tokens_per_split


def outer_product_arguments(tokens: torch.Tensor, buf: torch.Tensor, prefix: int) -> tuple[tuple, dict]:
    """(arguments, meta-parameters) of the weight-gradient GEMM over tokens, allocating its fp32
    partial (splits, C, Ca); the launcher and `inspect` both build the launch here."""
    batch, frames, _, channels = tokens.shape
    patches, bottleneck = buf.shape[2], buf.shape[3]
    count = batch * frames * patches
    config = configs.OUTER_PRODUCT[tokens.element_size()]
    splits, tokens_per_split = outer_product_splits(count, channels, bottleneck, tokens.element_size())
    partial = torch.empty((splits, channels, bottleneck), dtype=torch.float32, device=tokens.device)
    args = (tokens, buf, partial, frames, patches, channels, bottleneck, prefix, count, tokens_per_split,
            *tokens.stride()[:3])
    return args, dict(DOT_PRECISION=configs.dot_precision(tokens.dtype), BLOCK_N=config.block_n,
                      BLOCK_C=config.block_c, BLOCK_A=config.block_a)


def _token_outer_product(tokens: torch.Tensor, buf: torch.Tensor, prefix: int) -> torch.Tensor:
    """sum over patch tokens n of tokens[n, :]^T buf[n, :] in fp32, (C, Ca); split-K, fixed order."""
    args, meta = outer_product_arguments(tokens, buf, prefix)
    partial = args[2]
    config = configs.OUTER_PRODUCT[tokens.element_size()]
    grid = (triton.cdiv(partial.shape[1], config.block_c), triton.cdiv(partial.shape[2], config.block_a),
            partial.shape[0])
    torch.library.wrap_triton(token_outer_product_kernel)[grid](
        *args, **meta, num_warps=config.num_warps, num_stages=config.num_stages)
    return partial.sum(0)
