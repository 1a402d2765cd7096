"""Ahead-of-time resource report of every shipped Triton config: registers, spills, shared memory.

    python -m stadapter_kernels.inspect --arch sm_80,sm_90 [--json FILE] [--cubin-dir DIR]

Compiles each kernel of `stadapter_kernels.fused_triton` with each config of
`fused_triton.configs` for the requested GPU architectures, without a GPU or driver, and reads
the resource usage from the cubin with cuobjdump (shipped with Triton). A config whose LOCAL
or STACK bytes are above zero spills registers to local memory, and must not be shipped.
Run it without TRITON_INTERPRET=1: the interpreter replaces kernels by Python functions.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .activations import ACTIVATIONS

DEFAULT_CHANNELS = (768, 1024)
DEFAULT_BOTTLENECKS = (64, 128, 192, 256, 384)
#: gelu is among the costliest in registers; relu's backward keeps a float32 bottleneck ring.
DEFAULT_ACTIVATIONS = ("gelu", "relu")
_DTYPE_NAMES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Pointer arguments that are fp32 work buffers whatever the input dtype.
_FP32_POINTERS = {"dz_buf_ptr", "conv_partial_ptr", "dy_partial_ptr", "grad_partial_ptr", "partial_ptr"}
#: Integer arguments that are multiples of 16 for every shipped shape (C, Ca, strides), which
#: Triton's runtime specialisation would also mark, so the compile matches a real launch.
_ALIGNED_INTS = re.compile(r"^(C|CA|tokens_per_split|\w+_s[btl])$")


@dataclass
class Row:
    """Resource usage of one kernel, config, shape and architecture."""

    arch: str
    kernel: str
    config: str
    dtype: str
    channels: int
    bottleneck: int
    kernel_t: int
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    warps: int
    activation: str  # compiled in; "-" for kernels without one

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0


def _arch_number(arch: str) -> int:
    match = re.fullmatch(r"sm_?(\d+)", arch.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"architecture must look like sm_90, got {arch!r}")
    return int(match.group(1))


def _signature(fn, kernel: str, dtype: str, activation: str, constexprs: dict):
    from .fused_triton import configs

    ring = configs.ring_dtype(kernel, activation, _TORCH_DTYPES[dtype])
    ring_name = next(name for name, value in _TORCH_DTYPES.items() if value == ring)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "scratch_ptr":
            signature[name] = f"*{ring_name}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name == "scale":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if _ALIGNED_INTS.match(name):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", handle.name], check=True,
                              capture_output=True, text=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key: int(value) for key, value in usage.items()}


def _jobs(channels, bottlenecks, dtypes, kernel_t, activations):
    """(kernel name, jit function, constexprs, compile options, warps, stages, config name, dtype, C, Ca,
    activation) per compile; kernels without an activation once, labelled "-"."""
    from .fused_triton import _KERNELS, configs
    from .fused_triton.backward import token_outer_product_kernel
    from .fused_triton.common import ACTIVATION_IDS

    for dtype in dtypes:
        precision = configs.dot_precision(_TORCH_DTYPES[dtype])
        for c in channels:
            for ca in bottlenecks:
                for kernel in configs.TUNED_KERNELS:
                    for config in configs.SHIPPED[(kernel, configs.ca_pad(ca))]:
                        for activation in (activations if kernel != "backward_input" else ("-",)):
                            constexprs = dict(KT=kernel_t, CA_PAD=configs.ca_pad(ca), DOT_PRECISION=precision,
                                              BLOCK_P=config.block_p, BLOCK_C=config.block_c,
                                              BLOCK_A=configs.block_a(ca))
                            if kernel != "backward_input":
                                constexprs.update(ACTIVATION=ACTIVATION_IDS[activation], HAS_B_DOWN=True,
                                                  HAS_B_CONV=True, HAS_COND=True)
                            if kernel == "forward":
                                constexprs["HAS_B_UP"] = True
                            yield (kernel, _KERNELS[kernel], constexprs, {"maxnreg": config.maxnreg},
                                   config.num_warps, config.num_stages, config.name, dtype, c, ca, activation)
                config = configs.OUTER_PRODUCT[2 if dtype != "fp32" else 4]
                constexprs = dict(DOT_PRECISION=precision, BLOCK_N=config.block_n, BLOCK_C=config.block_c,
                                  BLOCK_A=config.block_a)
                yield ("weight_gradient", token_outer_product_kernel, constexprs, {}, config.num_warps,
                       config.num_stages, config.name, dtype, c, ca, "-")


def inspect(archs, channels=DEFAULT_CHANNELS, bottlenecks=DEFAULT_BOTTLENECKS, dtypes=("bf16", "fp16"),
            kernel_t=3, activations=DEFAULT_ACTIVATIONS, cubin_dir: Path | None = None) -> list[Row]:
    """Compile every shipped config for each architecture and return its resource usage."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels ahead of time")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    rows, compiled = [], {}
    for arch in archs:
        number = _arch_number(arch)
        for kernel, fn, constexprs, options, warps, stages, config_name, dtype, c, ca, activation in _jobs(
                channels, bottlenecks, dtypes, kernel_t, activations):
            # C and Ca are runtime arguments: shapes that share CA_PAD share one binary.
            key = (number, kernel, tuple(sorted(constexprs.items())), tuple(options.items()), warps, stages, dtype)
            if key not in compiled:
                signature, attrs = _signature(fn, kernel, dtype, activation, constexprs)
                source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
                binary = triton.compile(source, target=GPUTarget("cuda", number, 32),
                                        options={"num_warps": warps, "num_stages": stages, **options})
                compiled[key] = (_resource_usage(binary.asm["cubin"]), binary.metadata.shared)
                if cubin_dir is not None:
                    cubin_dir.mkdir(parents=True, exist_ok=True)
                    act = "" if activation == "-" else f"_{activation}"
                    name = (f"{kernel}_sm{number}_{dtype}{act}_capad{constexprs.get('CA_PAD', 'any')}_kt{kernel_t}_"
                            f"{config_name}")
                    (cubin_dir / f"{name}.cubin").write_bytes(binary.asm["cubin"])
            usage, shared = compiled[key]
            rows.append(Row(f"sm_{number}", kernel, config_name, dtype, c, ca, kernel_t, usage.get("REG", -1),
                            usage.get("LOCAL", 0), usage.get("STACK", 0), shared, warps, activation))
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("arch", "kernel", "config", "dtype", "act", "C", "Ca", "kt", "regs", "local", "stack", "smem", "warps",
              "")
    lines = [header] + [
        (r.arch, r.kernel, r.config, r.dtype, r.activation, str(r.channels), str(r.bottleneck), str(r.kernel_t),
         str(r.registers), str(r.local_bytes), str(r.stack_bytes), str(r.shared_bytes), str(r.warps),
         "SPILLS" if r.spills else "")
        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stadapter_kernels.inspect",
        description="Compile every shipped Triton config of the fused ST-Adapter kernels ahead of time "
                    "(no GPU needed) and print registers, spilled bytes (LOCAL and STACK), shared memory and "
                    "warps per kernel. Exits with status 1 if any config spills.",
        epilog="Columns: regs = registers per thread; local and stack = bytes of local memory per thread "
               "(spills when above 0); smem = shared memory per program in bytes. C and Ca are runtime "
               "arguments, so shapes whose Ca rounds up to the same power of two share one binary (and one "
               "cubin). Example: python -m stadapter_kernels.inspect --arch sm_80,sm_90 --json usage.json "
               "--cubin-dir cubins/. Run without TRITON_INTERPRET=1.")
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help="comma-separated CUDA architectures to compile for (default: %(default)s)")
    parser.add_argument("--channels", type=_int_list, default=DEFAULT_CHANNELS,
                        help="comma-separated model widths C (default: 768,1024)")
    parser.add_argument("--bottlenecks", type=_int_list, default=DEFAULT_BOTTLENECKS,
                        help="comma-separated bottleneck widths Ca (default: 64,128,192,256,384)")
    parser.add_argument("--dtypes", default="bf16,fp16", help="comma-separated: bf16, fp16, fp32 (default: %(default)s)")
    parser.add_argument("--kt", type=int, default=3, choices=(1, 3, 5), help="temporal kernel size (default: 3)")
    parser.add_argument("--activation", default=",".join(DEFAULT_ACTIVATIONS),
                        help="comma-separated activations compiled in (default: %(default)s: gelu is among the "
                             "costliest in registers, relu's backward keeps a float32 bottleneck ring)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--cubin-dir", type=Path, metavar="DIR",
                        help="write each compiled cubin to DIR, named by kernel, arch, dtype and config")
    args = parser.parse_args(argv)

    dtypes = tuple(args.dtypes.split(","))
    for dtype in dtypes:
        if dtype not in _DTYPE_NAMES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(_DTYPE_NAMES)}")
    activations = tuple(args.activation.split(","))
    for activation in activations:
        if activation not in ACTIVATIONS:
            parser.error(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    rows = inspect(args.arch.split(","), args.channels, args.bottlenecks, dtypes, args.kt, activations,
                   args.cubin_dir)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) | {"spills": row.spills} for row in rows], indent=1))
    spilling = sum(row.spills for row in rows)
    if spilling:
        print(f"{spilling} row(s) spill", file=sys.stderr)
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main())
