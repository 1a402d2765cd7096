"""The `cpp` backend: the fused C++ CPU kernels of csrc/, as the `stadapter_cpp` torch.library ops.

Follows the backend contract of `dispatch.py`. The ops take the output (`out`, `dx`) as a
mutated argument and write it in place, through its strides; their fake implementations here
let torch.compile trace the `stadapter::st_adapter` body that calls them.

Installed with STADAPTER_SKIP_CPP_BUILD=1, `stadapter_kernels._C` is missing: this module still
imports, and `unavailable_reason` says why the backend cannot serve, which `explain` reports.
"""

from __future__ import annotations

import os
import platform
import time

import torch

from .spec import AdapterOptions, AdapterSpec, AdapterTensors


#: The operators csrc/bindings.cpp registers: a _C built from older sources lacks some.
_EXTENSION_OPS = ("st_adapter_forward", "st_adapter_backward", "brgemm_serves", "cpu_vendor", "avx512_available")


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
    missing = [name for name in _EXTENSION_OPS if not hasattr(torch.ops.stadapter_cpp, name)]
    if missing:
        return (f"the C++ extension stadapter_kernels._C was built from older sources (it lacks "
                f"{', '.join(missing)}); rebuild it: `make extension` or `python setup.py build_ext --inplace`")
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


#: Whether the tile GEMMs with a weight operand (down- and up-projection, the backward's da and dx)
#: run through ATen's brgemm micro-kernels (at::native::cpublas::brgemm) where this CPU serves
#: them, per dtype of the GEMM operands: float32 for float32 calls and for 16-bit calls widened to
#: float32, the 16-bit dtype for native calls. Elsewhere, or False: the library GEMM (MKL float32,
#: oneDNN). 16-bit brgemm serves on AMX, where it skips oneDNN's per-call set-up (~60 us a GEMM,
#: paid per frame of every tile). Float32's None: by CPU and width, see FLOAT32_BRGEMM_MAX_BOTTLENECK.
#: Tests force each path this CPU has.
brgemm: dict[torch.dtype, bool | None] = {torch.float32: None, torch.bfloat16: True, torch.float16: True}

#: Float32 brgemm by default on AVX-512 CPUs: on Intel's only for bottlenecks this narrow, on AMD's at
#: every width, where MKL does not run its best float32 kernels. brgemm / MKL time of the cpp backend
#: (tools/measure_cpp.py --gemm-paths, fp32 forward / forward+backward): Intel Xeon (AVX-512) 0.79 / 0.89
#: at Ca = 64, 0.94 / 0.92 at Ca = 128, but 1.19 / 1.10 at Ca = 384 (AMX Xeon, family 6 model 167, with
#: MKL on weights packed once per call: 0.74 / 0.85 at 64, 0.87-0.89 / 0.92-0.93 at 128, 0.99 / 0.95 at
#: 192, 1.15-1.18 / 1.10-1.13 at 384); AMD Zen 4 (family 25 model 17)
#: 0.78 / 0.92 at Ca = 64, 0.85 / 0.94 at 128, 0.80-0.83 / 0.89-0.93 at 192, 0.83 / 0.88-0.89 at 256,
#: 0.84-0.89 / 0.87-0.88 at 384. AVX2 CPUs disagree, hence never there: AMD Zen 3 (family 25 model 1)
#: 4-44% slower; Zen 1 (family 23 model 1) 0.88 / 0.92 at Ca = 64, 0.98 / 0.99 at Ca = 128, 1.03 / 1.01
#: at Ca = 192, 1.06 / 1.06 at 384.
FLOAT32_BRGEMM_MAX_BOTTLENECK = 128
#: torch's CPU capability (AVX512, AVX2, ...) and the CPU's maker (AMD, Intel, other), read once:
#: `explain` runs inside torch.compile traces.
_CPU_CAPABILITY = torch.backends.cpu.get_cpu_capability()
_CPU_VENDOR = torch.ops.stadapter_cpp.cpu_vendor() if _BUILD_ERROR is None else "other"

#: Whether the kernels run their AVX-512 copy (csrc/st_adapter_cpu_avx512.cpp: the element-wise work
#: twice as wide) rather than the AVX2 one: where torch itself dispatches to AVX-512 (its CPU
#: capability, which ATEN_CPU_CAPABILITY can lower) and the CPU has what that copy is built for.
#: Intel Xeon with AMX (family 6 model 167), bf16 Ca = 384: forward 0.88x, forward+backward 0.93x the
#: AVX2 copy's time, bit-identical results. Tests force each copy this CPU has.
avx512 = (_BUILD_ERROR is None and _CPU_CAPABILITY.startswith("AVX512")
          and torch.ops.stadapter_cpp.avx512_available())


@torch.compiler.assume_constant_result  # a fact about this CPU: `explain` asks it inside torch.compile traces
def brgemm_serves(gemm_dtype: torch.dtype, channels: int, bottleneck: int) -> bool:
    """Whether brgemm computes GEMMs of `gemm_dtype` operands at these widths on this CPU with its own
    micro-kernels: float32 from AVX2 on; bfloat16/float16 where ATen packs weights for it (AMX,
    AMX-FP16), channels and bottleneck multiples of 16."""
    return _BUILD_ERROR is None and torch.ops.stadapter_cpp.brgemm_serves(gemm_dtype, channels, bottleneck)


#: Environment override of the measured choice: 1 = native 16-bit GEMMs, 0 = widened to float32.
NATIVE_GEMM_ENV = "STADAPTER_CPP_NATIVE_GEMM"
#: One frame's down-projection of a ViT-B/16 tile (196 patches, C = 768, Ca = 384): the GEMM the
#: choice between native and widened GEMMs is timed on, and timings per call of each, once measured.
CALIBRATION_SHAPE = (196, 768, 384)
calibration_seconds: dict[torch.dtype, tuple[float, float]] = {}
#: How much faster the float32 GEMM must be to widen: native 16-bit operands also halve the bytes
#: the kernel reads, and a clear margin keeps the choice (and so the rounding) the same from one
#: process to the next on CPUs where the two are close.
WIDEN_SPEEDUP = 1.25


def _best_gemm_seconds(dtype: torch.dtype, repeats: int = 8) -> float:
    """The fastest of `repeats` one-thread torch.mm calls of CALIBRATION_SHAPE in `dtype` (the
    minimum: what the GEMM costs when nothing else on the machine gets in its way)."""
    rows, k, n = CALIBRATION_SHAPE
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel runs each tile's GEMMs on one thread
    try:
        torch.mm(a, b)  # oneDNN builds its primitive, MKL its buffers
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        return best
    finally:
        torch.set_num_threads(threads)


def _choose_native_gemm(dtype: torch.dtype) -> bool:
    """Native 16-bit GEMMs where the CPU has them and they are not clearly slower than float32:
    always with brgemm (AMX: oneDNN kernels without per-call set-up), else by timing one frame's
    GEMM both ways (widened where float32 is WIDEN_SPEEDUP times faster). The ISA flags do not
    tell: with avx512_bf16 and no AMX, oneDNN's bf16 GEMM halved the GEMM time on an AMD Zen 4,
    and took 1.7x MKL's float32 time on an Intel Xeon whose AMX the OS leaves off."""
    if not cpu_has_native_gemm(dtype):
        return False
    forced = os.environ.get(NATIVE_GEMM_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if forced is not None:
        raise ValueError(f"{NATIVE_GEMM_ENV}={forced!r}: expected 1 (native 16-bit GEMMs) or 0 (widened to float32)")
    if brgemm.get(dtype, False) and brgemm_serves(dtype, CALIBRATION_SHAPE[1], CALIBRATION_SHAPE[2]):
        return True
    native, widened = _best_gemm_seconds(dtype), _best_gemm_seconds(torch.float32)
    calibration_seconds[dtype] = (native, widened)
    return native <= widened * WIDEN_SPEEDUP


#: How the GEMMs of bfloat16/float16 inputs run, per dtype: True = in that dtype (oneDNN or brgemm
#: with the CPU's bf16/fp16 instructions: AMX, avx512_bf16, avx512_fp16), False = widened to float32
#: (MKL). Chosen when this module is imported, not at a first call, which may be inside a
#: torch.compile trace, where nothing can be timed. Tests force each path by setting an entry.
native_gemm = {dtype: _BUILD_ERROR is None and _choose_native_gemm(dtype) for dtype in (torch.bfloat16, torch.float16)}


def _gemm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the GEMMs of a call in `dtype` take their operands in."""
    return dtype if native_gemm.get(dtype, False) else torch.float32


def _uses_brgemm(dtype: torch.dtype, channels: int, bottleneck: int) -> bool:
    gemm_dtype = _gemm_dtype(dtype)
    wanted = brgemm[gemm_dtype]
    if wanted is None:
        wanted = _CPU_CAPABILITY.startswith("AVX512") and (
            _CPU_VENDOR == "AMD" or bottleneck <= FLOAT32_BRGEMM_MAX_BOTTLENECK)
    return wanted and brgemm_serves(gemm_dtype, channels, bottleneck)


def gemm_path(dtype: torch.dtype, channels: int, bottleneck: int) -> str:
    """The GEMM path a call takes: brgemm/AMX, brgemm/AVX-512, brgemm/AVX2, oneDNN or MKL float32."""
    gemm_dtype = _gemm_dtype(dtype)
    if _uses_brgemm(dtype, channels, bottleneck):
        if gemm_dtype != torch.float32:
            return "brgemm/AMX"
        return "brgemm/AVX-512" if _CPU_CAPABILITY.startswith("AVX512") else "brgemm/AVX2"
    return "MKL float32" if gemm_dtype == torch.float32 else "oneDNN"


def available_gemm_paths(dtype: torch.dtype, channels: int, bottleneck: int) -> list[tuple[bool, bool]]:
    """Every (native_gemm, brgemm) setting that runs a distinct GEMM path for such a call on this CPU."""
    natives = (False,) if dtype == torch.float32 else (False, True)
    return [(native, use_brgemm) for native in natives for use_brgemm in (False, True)
            if not use_brgemm or brgemm_serves(dtype if native else torch.float32, channels, bottleneck)]


def unavailable_reason(spec: AdapterSpec) -> str | None:
    if _BUILD_ERROR is not None:
        return _BUILD_ERROR
    if spec.device.type != "cpu":
        return f"the C++ kernels serve CPU tensors, x is on {spec.device}"
    if spec.dtype not in SUPPORTED_DTYPES:
        return f"dtype {spec.dtype} is not supported by the C++ kernels (float32, bfloat16, float16)"
    if spec.spatial:
        return f"a spatial conv kernel {spec.kernel_hw} is served by the reference only"
    return None


def describe(spec: AdapterSpec) -> str | None:
    """The GEMM path of a call: for bfloat16/float16 whether its GEMMs are native or widened, for
    float32 only where it is not MKL (the one way float32 ran before brgemm)."""
    path = gemm_path(spec.dtype, spec.channels, spec.bottleneck)
    if spec.dtype == torch.float32:
        return None if path == "MKL float32" else f"float32 GEMMs through {path}"
    name = str(spec.dtype).removeprefix("torch.")
    measured = calibration_seconds.get(spec.dtype)
    timing = (f"one frame's GEMM measured {measured[0] * 1e6:.0f} us in {name}, {measured[1] * 1e6:.0f} us in "
              f"float32" if measured else None)
    if not native_gemm[spec.dtype]:
        note = f"{name} GEMMs widened to float32 ({path})"
        if not cpu_has_native_gemm(spec.dtype):
            note += f": this CPU has no native {name} matrix instructions for oneDNN"
        elif timing:
            note += f": {timing}"
        return note
    note = f"{name} GEMMs native ({path})" + (f": {timing}" if timing else "")
    if spec.activation == "relu" and path == "oneDNN":  # the rule lives in csrc/st_adapter_cpu.cpp: st_adapter_backward_cpu
        note += "; the backward recomputes the bottleneck with a float32 GEMM, as relu' jumps at 0"
    return note


def _gemm_flags(x: torch.Tensor, params: AdapterTensors) -> tuple[bool, bool]:
    """(native_gemm, brgemm) for this call."""
    return (native_gemm.get(x.dtype, False),
            _uses_brgemm(x.dtype, x.shape[-1], params.fc1_weight.shape[0]))


def forward(out: torch.Tensor, x: torch.Tensor, params: AdapterTensors, options: AdapterOptions) -> None:
    torch.ops.stadapter_cpp.st_adapter_forward(out, x, *params, options.prefix, options.activation,
                                               options.scale, tile_patches, *_gemm_flags(x, params),
                                               options.residual, avx512)


def backward(dx: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor, params: AdapterTensors,
             options: AdapterOptions) -> AdapterTensors:
    grads = torch.ops.stadapter_cpp.st_adapter_backward(dx, grad_out, x, *params, options.prefix,
                                                        options.activation, options.scale, tile_patches,
                                                        *_gemm_flags(x, params), options.residual, avx512)
    return AdapterTensors(*grads)


if _BUILD_ERROR is None:

    @torch.library.register_fake("stadapter_cpp::st_adapter_forward")
    def _forward_fake(out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, cond,
                      prefix, activation, scale, tile_patches=0, native_gemm=False, brgemm=False,
                      residual=True, avx512=False):
        return None

    @torch.library.register_fake("stadapter_cpp::st_adapter_backward")
    def _backward_fake(dx, grad_out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                       cond, prefix, activation, scale, tile_patches=0, native_gemm=False, brgemm=False,
                       residual=True, avx512=False):
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
