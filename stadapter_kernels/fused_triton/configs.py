"""Launch configurations and variant selection: the single source of truth for the launcher,
autotuning, `inspect` and the GPU check.

Public API (stable; the GPU check script builds on it):

- `VARIANTS`: the kernel sets, ``"fused"`` (one forward kernel, the bottleneck in a per-program
  ring) and ``"two_gemm"`` (y written by a plain GEMM, then a GEMM with the conv in its prologue).
- `VARIANT_KERNELS[variant]`: the autotuned kernels each variant launches, by name.
- `shipped(variant=None)`: every shipped (variant, kernel, CA_PAD, TileConfig) as `Shipped` rows.
- `forced(variant=..., frames_per_chunk=..., **{kernel: config_name})`: a context manager that
  makes every call inside it use that variant, exactly that config of the named kernels (no
  autotuning for them) and/or that T chunk length.
  The environment variables `STADAPTER_TRITON_VARIANT` (``fused``/``two_gemm``) and
  `STADAPTER_TRITON_CONFIG` (``kernel=config_name,...``) do the same for a whole process; the
  context manager wins over them.
- `AUTO_VARIANT`: the table `auto` reads, device name (as `torch.cuda.get_device_name`) ->
  variant; a device not in it gets `DEFAULT_VARIANT`. `variant_for(device)` applies forcing,
  then the table.
- `dot_precision(dtype)`: how tl.dot runs for inputs of `dtype`; for float32 it follows
  `torch.get_float32_matmul_precision()`.

Determinism: every config of one kernel gives the same bits (tests/triton/test_determinism.py):
the K step of every dot over C is `K_STEP` in every config, the row sums behind the bias and
conv gradients are fixed 16-row pairwise trees (`common.row_group_sums`), and every config of
one kernel keeps BLOCK_P <= 32, so on sm_90 all of them use the same MMA instruction
(mma.sync; wgmma needs 64-row tiles, which would change how products are summed). So
autotuning picks speed only, never bits.

Every config listed here compiles for sm_80 and sm_90 without spills (LOCAL and STACK 0) under
the runtime specialisation of a ViT-shaped launch; `tests/triton/test_resources.py` keeps it
that way and `python -m stadapter_kernels.inspect` prints the table.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass

import torch
import triton

from .common import UPCAST_PRECISION

VARIANTS = ("fused", "two_gemm")
DEFAULT_VARIANT = "fused"
ENV_VARIANT = "STADAPTER_TRITON_VARIANT"
ENV_CONFIG = "STADAPTER_TRITON_CONFIG"

#: The autotuned kernels of each variant. Both backward passes finish with `backward_input`
#: (dx = grad_out + dy @ w_down with the transposed conv in its prologue) and the fixed-config
#: weight-gradient GEMM.
VARIANT_KERNELS = {
    "fused": ("forward", "backward_bottleneck", "backward_input"),
    "two_gemm": ("down_gemm", "up_gemm", "dz_gemm", "backward_input"),
}
TUNED_KERNELS = tuple(dict.fromkeys(k for kernels in VARIANT_KERNELS.values() for k in kernels))

#: Channels of C per dot in every loop over C (the K step of the down-projection, of
#: grad_out @ w_up and of the weight-gradient GEMM's tokens): fixed, because with tf32x3 (three
#: MMAs per dot) a different step would regroup the products, and so change the bits.
K_STEP = 32
#: Rows of one pairwise row-sum group (common.row_group_sums), the smallest BLOCK_P: partial
#: bias/conv gradients are kept per 16 patch rows, so they do not depend on BLOCK_P.
ROW_GROUP = 16


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a tuned kernel.

    block_p: patch rows per program (the M tile).
    block_c: for `up_gemm` the C tile (N) of the up-projection GEMM; for every other kernel the
        step of its C loops, always `K_STEP`.
    """

    block_p: int
    block_c: int
    num_warps: int
    num_stages: int
    # The register budget (ptxas .maxnreg). It also sizes the persistent grid (registers x
    # threads per program decide how many programs fit on an SM, `programs_per_sm`).
    maxnreg: int = 255

    @property
    def name(self) -> str:
        return f"p{self.block_p}_c{self.block_c}_w{self.num_warps}_s{self.num_stages}_r{self.maxnreg}"

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_P": self.block_p, "BLOCK_C": self.block_c},
                             num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)

    def launch_options(self) -> dict:
        """The keyword arguments of a launch that forces this config."""
        return dict(BLOCK_P=self.block_p, BLOCK_C=self.block_c, num_warps=self.num_warps,
                    num_stages=self.num_stages, maxnreg=self.maxnreg)


@dataclass(frozen=True)
class OuterProductConfig:
    """The fixed launch configuration of the weight-gradient GEMM over tokens.

    Not autotuned: its split count and tile fix the reduction order, and a gradient must not
    change with which config a benchmark happened to pick.
    """

    block_n: int
    block_c: int
    block_a: int
    num_warps: int
    num_stages: int

    @property
    def name(self) -> str:
        return f"n{self.block_n}_c{self.block_c}_a{self.block_a}_w{self.num_warps}_s{self.num_stages}"


_CA_PADS = (16, 32, 64, 128, 256, 512)
_WIDE = TileConfig(32, K_STEP, 8, 2)  # first in every list: the interpreter's pick and the capture default
_NARROW = TileConfig(16, K_STEP, 4, 2, maxnreg=255)

#: (kernel, CA_PAD) -> configs, best guess first (the only one used under TRITON_INTERPRET=1,
#: and under CUDA-graph capture before autotuning ran). See the module docstring for why they
#: all give the same bits.
SHIPPED: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    **{("forward", ca_pad): (_WIDE, _NARROW) for ca_pad in _CA_PADS},
    **{("backward_bottleneck", ca_pad): (_WIDE, _NARROW) for ca_pad in _CA_PADS},
    **{("backward_input", ca_pad): (_WIDE, _NARROW) for ca_pad in _CA_PADS},
    **{("down_gemm", ca_pad): (TileConfig(32, K_STEP, 4, 3), TileConfig(16, K_STEP, 4, 3)) for ca_pad in _CA_PADS},
    **{("up_gemm", ca_pad): (TileConfig(32, 64, 4, 2), TileConfig(32, 128, 8, 2)) for ca_pad in _CA_PADS},
    **{("dz_gemm", ca_pad): (TileConfig(32, K_STEP, 4, 2), TileConfig(16, K_STEP, 4, 2)) for ca_pad in _CA_PADS},
}

#: The weight-gradient GEMM's config, per dtype size in bytes (fp32 tiles cost twice the shared memory).
OUTER_PRODUCT = {2: OuterProductConfig(64, 64, 64, 4, 3), 4: OuterProductConfig(32, 64, 64, 4, 2)}

#: Programs of a persistent launch in the interpreter: few, so its tests also cover programs
#: that take several work items.
INTERPRETER_PROGRAMS = 3
#: Widest chunk of the bottleneck computed or read back at once (a tl.dot operand tile). With
#: loops over chunks, register use no longer depends on Ca.
MAX_BLOCK_A = 64
#: Largest bottleneck the shipped configs cover.
MAX_BOTTLENECK = max(ca_pad for _, ca_pad in SHIPPED)

#: What `auto` runs on each GPU, by `torch.cuda.get_device_name()`. Filled from the GPU
#: check's measurements (both variants timed on that device); a device not listed runs
#: DEFAULT_VARIANT.
AUTO_VARIANT: dict[str, str] = {}

# Registers per SM and the allocation granularity (per warp, in registers per thread) on every
# architecture since sm_70; threads per SM is read from the device.
_REGISTERS_PER_SM = 65536
_REGISTER_GRANULE = 8


@dataclass(frozen=True)
class Shipped:
    """One row of `shipped()`."""

    variant: str
    kernel: str
    ca_pad: int
    config: TileConfig


def shipped(variant: str | None = None) -> list[Shipped]:
    """Every shipped config of every tuned kernel (of one variant, if given)."""
    variants = VARIANTS if variant is None else (_checked_variant(variant),)
    return [Shipped(v, kernel, ca_pad, config)
            for v in variants for (kernel, ca_pad), tile_configs in SHIPPED.items()
            if kernel in VARIANT_KERNELS[v] for config in tile_configs]


def _checked_variant(variant: str) -> str:
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return variant


@dataclass(frozen=True)
class _Forcing:
    variant: str | None = None
    kernel_configs: tuple[tuple[str, str], ...] = ()
    frames_per_chunk: int | None = None


_FORCED: contextvars.ContextVar[_Forcing] = contextvars.ContextVar("stadapter_triton_forced", default=_Forcing())


@contextlib.contextmanager
def forced(variant: str | None = None, *, frames_per_chunk: int | None = None, **kernel_configs: str | TileConfig):
    """Run every call inside with this variant, these configs (by kernel name) and/or this
    T chunk length of the persistent kernels' work items.

        with configs.forced(variant="two_gemm", up_gemm="p32_c128_w8_s2_r255"):
            out = st_adapter(..., backend="triton")

    A forced kernel launches that config only (no autotuning); a name that is not shipped for
    the call's CA_PAD raises ValueError at the launch. `frames_per_chunk` replaces the chunk
    length chosen from the shape and SM count (results are the same bits either way). Nests:
    inner settings add to outer ones.
    """
    if variant is not None:
        _checked_variant(variant)
    unknown = set(kernel_configs) - set(TUNED_KERNELS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; tuned kernels are {TUNED_KERNELS}")
    if frames_per_chunk is not None and frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
    outer = _FORCED.get()
    names = {k: (c.name if isinstance(c, TileConfig) else c) for k, c in kernel_configs.items()}
    token = _FORCED.set(_Forcing(variant or outer.variant, tuple({**dict(outer.kernel_configs), **names}.items()),
                                 frames_per_chunk or outer.frames_per_chunk))
    try:
        yield
    finally:
        _FORCED.reset(token)


def forced_frames_per_chunk() -> int | None:
    """The T chunk length forced by `forced(frames_per_chunk=...)`, or None."""
    return _FORCED.get().frames_per_chunk


def _environment_configs() -> dict[str, str]:
    text = os.environ.get(ENV_CONFIG, "").strip()
    if not text:
        return {}
    pairs = [part.split("=", 1) for part in text.split(",")]
    if any(len(pair) != 2 or pair[0].strip() not in TUNED_KERNELS for pair in pairs):
        raise ValueError(f"{ENV_CONFIG} must be 'kernel=config_name,...' with kernels from {TUNED_KERNELS}, "
                         f"got {text!r}")
    return {kernel.strip(): name.strip() for kernel, name in pairs}


def forced_config(kernel: str, bottleneck: int) -> TileConfig | None:
    """The config forced for this kernel (by `forced` or ENV_CONFIG), or None to autotune."""
    name = {**_environment_configs(), **dict(_FORCED.get().kernel_configs)}.get(kernel)
    if name is None:
        return None
    available = SHIPPED[(kernel, ca_pad(bottleneck))]
    for config in available:
        if config.name == name:
            return config
    raise ValueError(f"config {name!r} is not shipped for {kernel} at CA_PAD {ca_pad(bottleneck)}; "
                     f"shipped: {[c.name for c in available]}")


def auto_variant(device_name: str) -> str:
    """The variant `auto` runs on a device of this name (AUTO_VARIANT, else DEFAULT_VARIANT)."""
    return AUTO_VARIANT.get(device_name, DEFAULT_VARIANT)


def variant_for(device: torch.device) -> str:
    """The variant a call on `device` runs: forced, else STADAPTER_TRITON_VARIANT, else the table."""
    variant = _FORCED.get().variant or os.environ.get(ENV_VARIANT, "").strip() or None
    if variant is not None:
        return _checked_variant(variant)
    if device.type != "cuda":
        return DEFAULT_VARIANT
    return auto_variant(torch.cuda.get_device_name(device))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


#: tl.dot input_precision for float32 inputs per torch.get_float32_matmul_precision(). "highest"
#: gets tf32x3 (three tf32 MMAs with the operands split into high and low parts: about fp32
#: accuracy, DESIGN.md's 1e-5) rather than "ieee" (FMA units), which spills the fused kernels.
FP32_PRECISION = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for this input dtype (the 16-bit dtypes ignore it on a GPU).

    The interpreter computes every dot exactly whatever the precision, but multiplies bf16
    operands as raw bits, so bf16 there gets UPCAST_PRECISION.
    """
    if dtype == torch.float32:
        return FP32_PRECISION[torch.get_float32_matmul_precision()]
    if interpreting() and dtype == torch.bfloat16:
        return UPCAST_PRECISION
    return "ieee"


def ring_dtype(kernel: str, activation: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of the stored bottleneck y (the fused ring, the two-GEMM y buffer).

    The inputs' dtype halves its footprint, and rounding y there costs the output only ~2^-9
    relative. The backward's y for relu is float32: relu' jumps at z = 0, so where a rounded y
    moves z across zero, dz is wrong by all of da, which put 2-5% errors into the conv, fc1 and
    cond gradients of bf16 runs (DESIGN.md allows 1e-2).
    """
    backward = kernel in ("backward_bottleneck", "dz_gemm")
    return torch.float32 if backward and activation == "relu" else dtype


def ca_pad(bottleneck: int) -> int:
    """Ca rounded up to a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(bottleneck))


def block_a(bottleneck: int, dtype: torch.dtype) -> int:
    """Channels of the bottleneck handled at once (the Ca chunk of every kernel): MAX_BLOCK_A,
    half that for float32, whose tf32x3 dots hold twice the operand registers (at 64 the
    backward kernels spill on sm_90). A function of the dtype, not of the config, so it never
    changes the bits between configs."""
    widest = MAX_BLOCK_A // 2 if dtype == torch.float32 else MAX_BLOCK_A
    return min(ca_pad(bottleneck), widest)


def configs_for(kernel: str, bottleneck: int) -> tuple[TileConfig, ...]:
    """The configs a launch may use: the forced one, else the shipped list (its first only
    under the interpreter, which would otherwise run, slowly, every config)."""
    one = forced_config(kernel, bottleneck)
    if one is not None:
        return (one,)
    configs = SHIPPED[(kernel, ca_pad(bottleneck))]
    return configs[:1] if interpreting() else configs


def programs_per_sm(config: TileConfig, threads_per_sm: int) -> int:
    """Programs of this config that fit on one SM by registers and threads: the register budget
    (maxnreg, which ptxas never exceeds) x the program's threads, in allocation granules."""
    threads = config.num_warps * 32
    registers = -(-config.maxnreg // _REGISTER_GRANULE) * _REGISTER_GRANULE
    return max(1, min(_REGISTERS_PER_SM // (registers * threads), threads_per_sm // threads))
