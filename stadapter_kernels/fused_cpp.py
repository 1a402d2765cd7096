"""The `cpp` backend: the fused C++ CPU kernels of csrc/, as the `stadapter_cpp` torch.library ops.

Follows the backend contract of `dispatch.py`. The ops take the output (`out`, `dx`) as a
mutated argument and write it in place, through its strides; their fake implementations here
let torch.compile trace the `stadapter::st_adapter` body that calls them.

Installed with STADAPTER_SKIP_CPP_BUILD=1, `stadapter_kernels._C` is missing: this module still
imports, and `unavailable_reason` says why the backend cannot serve, which `explain` reports.
"""

from __future__ import annotations

import platform

import torch

from .spec import AdapterOptions, AdapterSpec, AdapterTensors


def _load_extension() -> str | None:
    """Load stadapter_kernels._C; return why it cannot serve, or None."""
    if platform.machine() in ("x86_64", "AMD64") and not torch.cpu._is_avx2_supported():
        # setup.py compiles csrc/ with -mavx2 -mfma: running it here would be an illegal instruction.
        return "this CPU lacks AVX2, which the C++ extension is compiled for"
    try:
        from . import _C  # noqa: F401  (loading the library registers torch.ops.stadapter_cpp)
    except ImportError as error:
        return (f"the C++ extension stadapter_kernels._C is not built ({error}); reinstall without "
                "STADAPTER_SKIP_CPP_BUILD=1 to compile csrc/")
    return None


_BUILD_ERROR = _load_extension()

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Patch rows per tile; 0 lets the kernel pick from the shape. Tests set it small to exercise
#: many tiles, partial last tiles and multi-tile weight-gradient groups on tiny shapes.
tile_patches = 0


def cpu_has_native_gemm(dtype: torch.dtype) -> bool:
    """Whether torch's GEMMs in this 16-bit dtype run on the CPU's own instructions (oneDNN)."""
    if not torch.backends.mkldnn.is_available():
        return False
    check = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
             torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    return check is not None and check()


#: How the GEMMs of bfloat16/float16 inputs run, per dtype: True = in that dtype (oneDNN with the
#: CPU's bf16/fp16 instructions: avx512_bf16, AMX, avx512_fp16), False = widened to float32 (MKL).
#: The default is what this CPU runs natively; tests force each path.
native_gemm = {dtype: cpu_has_native_gemm(dtype) for dtype in (torch.bfloat16, torch.float16)}


def unavailable_reason(spec: AdapterSpec) -> str | None:
    if _BUILD_ERROR is not None:
        return _BUILD_ERROR
    if spec.device.type != "cpu":
        return f"the C++ kernels serve CPU tensors, x is on {spec.device}"
    if spec.dtype not in SUPPORTED_DTYPES:
        return f"dtype {spec.dtype} is not supported by the C++ kernels (float32, bfloat16, float16)"
    if spec.spatial:
        return f"a spatial conv kernel {spec.kernel_hw} is served by the reference only"
    if not spec.residual:
        return "residual=False (the adapter branch alone) is not fused yet"
    return None


def describe(spec: AdapterSpec) -> str | None:
    """How the GEMMs of a bfloat16/float16 call run (float32 calls have one way)."""
    if spec.dtype not in native_gemm:
        return None
    name = str(spec.dtype).removeprefix("torch.")
    if not native_gemm[spec.dtype]:
        return (f"{name} GEMMs widened to float32 (MKL): this CPU has no native {name} matrix "
                "instructions for oneDNN")
    note = f"{name} GEMMs native (oneDNN)"
    if spec.activation == "relu":  # the rule lives in csrc/st_adapter_cpu.cpp: st_adapter_backward_cpu
        note += "; the backward recomputes the bottleneck with a float32 GEMM, as relu' jumps at 0"
    return note


def forward(out: torch.Tensor, x: torch.Tensor, params: AdapterTensors, options: AdapterOptions) -> None:
    torch.ops.stadapter_cpp.st_adapter_forward(out, x, *params, options.prefix, options.activation,
                                               options.scale, tile_patches, native_gemm.get(x.dtype, False))


def backward(dx: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, params: AdapterTensors,
             options: AdapterOptions) -> AdapterTensors:
    grads = torch.ops.stadapter_cpp.st_adapter_backward(dx, grad_out, x, *params, options.prefix,
                                                        options.activation, options.scale, tile_patches,
                                                        native_gemm.get(x.dtype, False))
    return AdapterTensors(*grads)


if _BUILD_ERROR is None:

    @torch.library.register_fake("stadapter_cpp::st_adapter_forward")
    def _forward_fake(out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond,
                      prefix, activation, scale, tile_patches=0, native_gemm=False):
        return None

    @torch.library.register_fake("stadapter_cpp::st_adapter_backward")
    def _backward_fake(dx, grad_out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                       cond, prefix, activation, scale, tile_patches=0, native_gemm=False):
        batch, bottleneck = x.shape[0], fc1_weight.shape[0]
        return (
            fc1_weight.new_empty(fc1_weight.shape),
            fc1_weight.new_empty((bottleneck,)),
            conv_weight.new_empty(conv_weight.shape),
            conv_weight.new_empty((bottleneck,)),
            fc2_weight.new_empty(fc2_weight.shape),
            fc2_weight.new_empty((fc2_weight.shape[0],)),
            fc1_weight.new_empty((batch, bottleneck)),
        )
