"""The shipped launch configurations: the single source of truth for autotuning and `inspect`.

Tile sizes are chosen per kernel and per CA_PAD (Ca rounded up to a power of two): register
use grows with BLOCK_P and the BLOCK_A chunk of the bottleneck, and what fits moves with the
architecture. Every config listed here was compiled ahead of time for sm_80 and sm_90 and
shows no spill (LOCAL and STACK both 0) with the gelu and relu activations (relu's backward has
a float32 ring, see `ring_dtype`), for bf16 and fp16 at kt = 3, and with gelu for bf16 at kt = 1
and 5 and fp32 (as tf32) at kt = 3; `tests/triton/test_resources.py` keeps it that way for
sm_90 and kt = 3, and
`python -m stadapter_kernels.inspect` prints the table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .common import UPCAST_PRECISION


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a bottleneck kernel."""

    block_p: int  # patch positions per program
    block_c: int  # channels per step of the C loops
    num_warps: int
    num_stages: int
    # An explicit register budget (ptxas .maxnreg). Without one ptxas sometimes stops at 64-80
    # registers and spills a long-lived value to the stack; with it, it uses the registers.
    maxnreg: int = 255

    @property
    def name(self) -> str:
        return f"p{self.block_p}_c{self.block_c}_w{self.num_warps}_s{self.num_stages}"

    def triton_config(self) -> triton.Config:
        return triton.Config({"BLOCK_P": self.block_p, "BLOCK_C": self.block_c},
                             num_warps=self.num_warps, num_stages=self.num_stages, maxnreg=self.maxnreg)


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


#: Kernels whose configs are autotuned, keyed by name.
TUNED_KERNELS = ("forward", "backward_bottleneck", "backward_input")

_WIDE = TileConfig(32, 32, 8, 2)  # spill-free for every kernel and Ca; first, so the interpreter's pick

#: (kernel, CA_PAD) -> configs, best guess first (the only one used under TRITON_INTERPRET=1).
#: Each alternative is listed only where it compiled spill-free on sm_80 and sm_90.
SHIPPED: dict[tuple[str, int], tuple[TileConfig, ...]] = {
    **{("forward", ca_pad): (_WIDE,) for ca_pad in (16, 32)},
    **{("forward", ca_pad): (_WIDE, TileConfig(16, 32, 4, 2)) for ca_pad in (64, 128, 256)},
    ("forward", 512): (_WIDE, TileConfig(64, 32, 8, 2)),
    **{("backward_bottleneck", ca_pad): (_WIDE, TileConfig(16, 32, 4, 2)) for ca_pad in (16, 32, 64, 128, 256, 512)},
    **{("backward_input", ca_pad): (_WIDE, TileConfig(32, 32, 4, 2)) for ca_pad in (16, 32, 64, 128, 256, 512)},
}

#: The weight-gradient GEMM's config, per dtype size in bytes (fp32 tiles cost twice the shared memory).
OUTER_PRODUCT = {2: OuterProductConfig(64, 64, 64, 4, 3), 4: OuterProductConfig(32, 64, 64, 4, 2)}

#: Persistent kernels launch this many programs per SM (two resident programs hide the
#: barrier stalls of one), and this many in the interpreter.
PROGRAMS_PER_SM = 2
INTERPRETER_PROGRAMS = 3
#: Widest chunk of the bottleneck computed or read back at once (a tl.dot operand tile). With
#: loops over chunks, register use no longer depends on Ca; 64 leaves the backward bottleneck
#: kernel some 50 registers clear of spilling, where 128 sat at 255 and spilled on sm_90.
MAX_BLOCK_A = 64

#: Largest bottleneck the shipped configs cover.
MAX_BOTTLENECK = max(ca_pad for _, ca_pad in SHIPPED)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for this input dtype (the 16-bit dtypes ignore it).

    fp32 runs as tf32 on the GPU, which DESIGN.md allows (<= 5e-4): exact fp32 ("ieee") dots
    run on FMA units and spill every shipped config. The interpreter computes exactly either
    way, and needs UPCAST_PRECISION for bf16.
    """
    if interpreting():
        return UPCAST_PRECISION if dtype == torch.bfloat16 else "ieee"
    return "tf32" if dtype == torch.float32 else "ieee"


def ring_dtype(kernel: str, activation: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype of a kernel's scratch ring of bottleneck tiles (y), for inputs of `dtype`.

    The inputs' dtype halves the ring's cache footprint, and rounding y there costs the output
    only ~2^-9 relative. The backward's ring for relu is float32: relu' jumps at z = 0, so where
    a rounded y moves z across zero, dz is wrong by all of da, which put 2-5% errors into the
    conv, fc1 and cond gradients of bf16 runs (DESIGN.md allows 1e-2).
    """
    return torch.float32 if kernel == "backward_bottleneck" and activation == "relu" else dtype


def ca_pad(bottleneck: int) -> int:
    """Ca rounded up to a power of two, at least 16 (the smallest tl.dot dimension)."""
    return max(16, triton.next_power_of_2(bottleneck))


def block_a(bottleneck: int) -> int:
    """Channels of the bottleneck handled at once when it is read back from scratch."""
    return min(ca_pad(bottleneck), MAX_BLOCK_A)


def configs_for(kernel: str, bottleneck: int) -> tuple[TileConfig, ...]:
    """The configs autotuning may pick for this kernel and Ca; one under the interpreter, which
    would otherwise run (slowly) every config."""
    configs = SHIPPED[(kernel, ca_pad(bottleneck))]
    return configs[:1] if interpreting() else configs
