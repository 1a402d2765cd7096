"""The fused Triton backend of `stadapter::st_adapter` (the backend contract of dispatch.py).

`forward` launches one kernel; `backward` launches four (see backward.py) and keeps nothing
of the forward but x. Kernels are launched through `torch.library.wrap_triton`, so
torch.compile sees them inside the op's `triton_op`. Autotuning is keyed on (C, Ca, kt) and
the dtypes of the tensor arguments, over the spill-free configs of `configs.SHIPPED`.
"""

from __future__ import annotations

import functools

import torch
import triton

from ..spec import AdapterOptions, AdapterSpec, AdapterTensors
from . import configs
from .backward import (st_adapter_backward_bottleneck_kernel, st_adapter_backward_input_kernel,
                       token_outer_product_kernel)
from .common import ACTIVATION_IDS, MAX_KERNEL_T
from .forward import st_adapter_forward_kernel

__all__ = ["backward", "forward", "unavailable_reason"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNELS = {
    "forward": st_adapter_forward_kernel,
    "backward_bottleneck": st_adapter_backward_bottleneck_kernel,
    "backward_input": st_adapter_backward_input_kernel,
}
#: Programs a split-K weight-gradient launch aims for (about two waves on an H100's 132 SMs).
_OUTER_PRODUCT_PROGRAMS = 264


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
    if not spec.residual:
        return "residual=False (the adapter branch alone) is not fused yet"
    if spec.kernel_t > MAX_KERNEL_T:
        return f"temporal kernel kt={spec.kernel_t} is larger than the fused maximum {MAX_KERNEL_T}"
    if spec.bottleneck > configs.MAX_BOTTLENECK:
        return f"bottleneck Ca={spec.bottleneck} is larger than the fused maximum {configs.MAX_BOTTLENECK}"
    return None


@functools.cache
def _tuned(kernel: str, ca_pad: int):
    """The autotuned kernel for one CA_PAD bucket, over that bucket's shipped configs.

    Every kernel writes all of its outputs on every launch, so benchmarking configs on the
    real arguments leaves nothing stale behind."""
    tile_configs = configs.configs_for(kernel, ca_pad)
    return triton.autotune(configs=[c.triton_config() for c in tile_configs], key=["C", "CA", "KT"])(
        _KERNELS[kernel])


def _launch(kernel: str, ca_pad: int):
    return torch.library.wrap_triton(_tuned(kernel, ca_pad))


def _constexprs(params: AdapterTensors, options: AdapterOptions) -> dict:
    return dict(
        KT=params.conv_weight.shape[2], CA_PAD=configs.ca_pad(params.fc1_weight.shape[0]),
        ACTIVATION=ACTIVATION_IDS[options.activation],
        HAS_B_DOWN=params.fc1_bias is not None, HAS_B_CONV=params.conv_bias is not None,
        HAS_COND=params.cond is not None,
        DOT_PRECISION=configs.dot_precision(params.fc1_weight.dtype),
        BLOCK_A=configs.block_a(params.fc1_weight.shape[0]),
    )


def _weights(params: AdapterTensors):
    """Contiguous parameters (small) and a placeholder for each absent one."""
    w_down = params.fc1_weight.contiguous()
    def given(t):
        return w_down if t is None else t.contiguous()
    return (w_down, given(params.fc1_bias), params.conv_weight.reshape(params.conv_weight.shape[0], -1).contiguous(),
            given(params.conv_bias), params.fc2_weight.contiguous(), given(params.fc2_bias), given(params.cond))


def _tiles(count: int, meta) -> int:
    return triton.cdiv(count, meta["BLOCK_P"])


def _max_tiles(count: int, kernel: str, bottleneck: int) -> int:
    """Tiles of the smallest BLOCK_P autotuning may pick: the row count of per-program partials."""
    return triton.cdiv(count, min(c.block_p for c in configs.configs_for(kernel, bottleneck)))


def _persistent_programs(device: torch.device) -> int:
    """Programs of a persistent launch: a few per SM on a GPU; few in the interpreter, so its
    tests also cover programs that take several work items."""
    if device.type != "cuda":
        return configs.INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count * configs.PROGRAMS_PER_SM


def _scratch(programs: int, kernel: str, tiles: int, params: AdapterTensors, dtype, device) -> torch.Tensor:
    """Each persistent program's scratch: `tiles` bottleneck tiles of the largest BLOCK_P."""
    bottleneck = params.fc1_weight.shape[0]
    block_p = max(c.block_p for c in configs.configs_for(kernel, bottleneck))
    return torch.empty((programs, tiles * block_p * configs.ca_pad(bottleneck)), dtype=dtype, device=device)


def forward(out: torch.Tensor, x: torch.Tensor, params: AdapterTensors, options: AdapterOptions) -> None:
    """Write the adapter's output into `out`; both are strided (B, T, L, C) views."""
    batch, frames, _, channels = x.shape
    bottleneck, kernel_t = params.fc1_weight.shape[0], params.conv_weight.shape[2]
    prefix = options.prefix
    patches = x.shape[2] - prefix
    w_down, b_down, w_conv, b_conv, w_up, b_up, cond = _weights(params)
    constexprs = _constexprs(params, options)
    programs = _persistent_programs(x.device)
    # The ring of kt bottleneck tiles and the activated tile.
    scratch = _scratch(programs, "forward", kernel_t + 1, params,
                       configs.ring_dtype("forward", options.activation, x.dtype), x.device)

    def grid(meta):
        return (min(programs, batch * (_tiles(prefix, meta) + _tiles(patches, meta))),)

    _launch("forward", constexprs["CA_PAD"])[grid](
        x, out, w_down, b_down, w_conv, b_conv, w_up, b_up, cond, scratch,
        batch, frames, patches, channels, bottleneck, prefix, scratch.shape[1],
        *x.stride()[:3], *out.stride()[:3],
        float(options.scale),
        HAS_B_UP=params.fc2_bias is not None, **constexprs,
    )


def backward(dx: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, params: AdapterTensors,
             options: AdapterOptions) -> AdapterTensors:
    """Write dL/dx into `dx` and return every parameter gradient; see backward.py."""
    batch, frames, _, channels = x.shape
    bottleneck, kernel_t = params.fc1_weight.shape[0], params.conv_weight.shape[2]
    prefix = options.prefix
    patches = x.shape[2] - prefix
    dtype, device = x.dtype, x.device
    w_down, b_down, w_conv, b_conv, w_up, _, cond = _weights(params)
    constexprs = _constexprs(params, options)
    ca_pad = constexprs["CA_PAD"]
    programs = _persistent_programs(device)

    # Transient (tokens x Ca) buffers; they die with this call.
    a_buf = torch.empty((batch, frames, patches, bottleneck), dtype=dtype, device=device)
    dz_buf = torch.empty((batch, frames, patches, bottleneck), dtype=torch.float32, device=device)
    dy_buf = torch.empty_like(a_buf)
    scratch = _scratch(programs, "backward_bottleneck", kernel_t, params,
                       configs.ring_dtype("backward_bottleneck", options.activation, dtype), device)
    # Per-program partials, sized for the most programs (smallest BLOCK_P) any config launches;
    # the kernels zero the rows their launch leaves over.
    conv_partial = torch.empty((programs, kernel_t + 1, bottleneck), dtype=torch.float32, device=device)
    input_tiles = _max_tiles(patches, "backward_input", bottleneck)
    dy_partial = torch.empty((batch, frames * input_tiles, bottleneck), dtype=torch.float32, device=device)
    grad_partial = torch.empty((batch * frames * input_tiles, channels), dtype=torch.float32, device=device)

    _launch("backward_bottleneck", ca_pad)[lambda meta: (min(programs, batch * _tiles(patches, meta)),)](
        x, grad_out, w_down, b_down, w_conv, b_conv, w_up, cond,
        a_buf, dz_buf, conv_partial, scratch,
        batch, frames, patches, channels, bottleneck, prefix, scratch.shape[1], programs,
        *x.stride()[:3], *grad_out.stride()[:3],
        float(options.scale),
        **constexprs,
    )
    _launch("backward_input", ca_pad)[lambda meta: (_tiles(prefix, meta) + _tiles(patches, meta), frames, batch)](
        grad_out, dx, w_down, w_conv, dz_buf, dy_buf, dy_partial, grad_partial,
        frames, patches, channels, bottleneck, prefix, input_tiles,
        *grad_out.stride()[:3], *dx.stride()[:3],
        KT=kernel_t, CA_PAD=ca_pad, DOT_PRECISION=constexprs["DOT_PRECISION"], BLOCK_A=constexprs["BLOCK_A"],
    )
    d_up_weight = _token_outer_product(grad_out, a_buf, prefix) * options.scale
    d_down_weight = _token_outer_product(x, dy_buf, prefix).T

    conv_sums = conv_partial.sum(0)  # (kt + 1, Ca)
    dy_sums = dy_partial.sum(1)  # (B, Ca)
    return AdapterTensors(
        d_down_weight.to(dtype), dy_sums.sum(0).to(dtype),
        # copy=True: both conv gradients are views of conv_sums, and op outputs must not alias.
        conv_sums[:kernel_t].T.reshape(params.conv_weight.shape).to(dtype, copy=True),
        conv_sums[kernel_t].to(dtype, copy=True),
        d_up_weight.to(dtype), (grad_partial.sum(0) * options.scale).to(dtype), dy_sums.to(dtype),
    )


def _token_outer_product(tokens: torch.Tensor, buf: torch.Tensor, prefix: int) -> torch.Tensor:
    """sum over patch tokens n of tokens[n, :]^T buf[n, :] in fp32, (C, Ca); split-K, fixed order."""
    batch, frames, _, channels = tokens.shape
    patches, bottleneck = buf.shape[2], buf.shape[3]
    count = batch * frames * patches
    config = configs.OUTER_PRODUCT[tokens.element_size()]
    tiles = triton.cdiv(channels, config.block_c) * triton.cdiv(bottleneck, config.block_a)
    # Enough splits to fill the GPU, each a whole number of BLOCK_N steps; a function of the
    # shape only, so the reduction order (and the result) never changes between calls.
    splits = max(1, min(triton.cdiv(count, config.block_n), triton.cdiv(_OUTER_PRODUCT_PROGRAMS, tiles)))
    tokens_per_split = triton.cdiv(triton.cdiv(count, splits), config.block_n) * config.block_n
    splits = triton.cdiv(count, tokens_per_split)
    partial = torch.empty((splits, channels, bottleneck), dtype=torch.float32, device=tokens.device)
    grid = (triton.cdiv(channels, config.block_c), triton.cdiv(bottleneck, config.block_a), splits)
    torch.library.wrap_triton(token_outer_product_kernel)[grid](
        tokens, buf, partial,
        frames, patches, channels, bottleneck, prefix, count, tokens_per_split,
        *tokens.stride()[:3],
        DOT_PRECISION=configs.dot_precision(tokens.dtype),
        BLOCK_N=config.block_n, BLOCK_C=config.block_c, BLOCK_A=config.block_a,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return partial.sum(0)
