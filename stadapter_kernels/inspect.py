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
import itertools
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
#: Videos per launch compiled: Triton turns an int argument equal to 1 into a constant, so a
#: batch-1 call (B = 1, and there one frame per chunk) runs other binaries than a batch-8 one.
DEFAULT_BATCHES = (1, 8)
#: Frames and tokens per frame of the launches compiled (ViT-B/16 on 8-frame clips; P = 196 is
#: not a multiple of 16, so it is not marked divisible, as at run time).
FRAMES, TOKENS, PREFIX = 8, 197, 1
_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Streaming multiprocessors and shared memory per SM (bytes) of the GPUs each arch stands for
#: (A100, H100 SXM): the persistent grids' sizes and the occupancy check.
_ARCH_SMS = {80: 108, 90: 132}
_ARCH_SHARED_PER_SM = {80: 167936, 90: 233472}
_THREADS_PER_SM = 2048


@dataclass
class Row:
    """Resource usage of one kernel, config, launch and architecture."""

    arch: str
    variant: str
    kernel: str
    config: str
    dtype: str  # fp32 with its dot precision, e.g. fp32/tf32x3
    batch: int
    channels: int
    bottleneck: int
    kernel_t: int
    registers: int
    local_bytes: int
    stack_bytes: int
    shared_bytes: int
    warps: int
    stages: int
    programs_per_sm: int  # what the launcher sizes a persistent grid by (configs.programs_per_sm)
    specialised: str  # arguments the runtime made constants, e.g. "B=1 prefix=1"
    activation: str  # compiled in; "-" for kernels without one

    @property
    def spills(self) -> bool:
        return self.local_bytes > 0 or self.stack_bytes > 0


def _arch_number(arch: str) -> int:
    match = re.fullmatch(r"sm_?(\d+)", arch.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"architecture must look like sm_90, got {arch!r}")
    return int(match.group(1))


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


@dataclass
class _Job:
    """One launch to compile: the launcher's own arguments, and the config to compile it with."""

    variant: str
    kernel: str
    fn: object
    args: tuple
    constexprs: dict
    config_name: str
    launch_options: dict  # num_warps, num_stages, maxnreg and the config's meta-parameters
    dtype: str
    batch: int
    channels: int
    bottleneck: int
    activation: str
    programs_per_sm: int


def _example_call(batch, channels, bottleneck, kernel_t, dtype, activation):
    """CPU tensors shaped like a real call (never read: only their dtypes, strides, alignment
    and sizes reach the compiler, as on a GPU)."""
    from .spec import AdapterOptions, AdapterTensors

    def empty(*shape, dtype=dtype):
        return torch.empty(shape, dtype=dtype)

    x = empty(batch, FRAMES, TOKENS, channels)
    params = AdapterTensors(empty(bottleneck, channels), empty(bottleneck), empty(bottleneck, 1, kernel_t, 1, 1),
                            empty(bottleneck), empty(channels, bottleneck), empty(channels), empty(batch, bottleneck))
    return x, params, AdapterOptions(prefix=PREFIX, activation=activation, scale=0.5)


def _jobs(arch, variants, channels, bottlenecks, dtypes, batches, kernel_t, activations):
    """Every launch of every variant's forward and backward at these shapes, once per shipped
    config of its kernel; the weight-gradient GEMM with its one fixed config."""
    from . import fused_triton
    from .fused_triton import configs

    sms = _ARCH_SMS.get(arch, 132)
    for dtype in dtypes:
        torch_dtype = _TORCH_DTYPES[dtype.split("/")[0]]
        label = f"fp32/{configs.dot_precision(torch.float32)}" if torch_dtype == torch.float32 else dtype
        for variant, batch, c, ca, activation in itertools.product(variants, batches, channels, bottlenecks,
                                                                   activations):
            x, params, options = _example_call(batch, c, ca, kernel_t, torch_dtype, activation)
            programs = sms * configs.programs_per_sm(configs.SHIPPED[("forward", configs.ca_pad(ca))][0],
                                                     _THREADS_PER_SM)
            length = fused_triton.frames_per_chunk(batch, FRAMES, TOKENS - PREFIX, kernel_t, programs)
            with configs.forced(variant=variant, frames_per_chunk=length):
                launches = fused_triton.forward_launches(torch.empty_like(x), x, params, options)
                backward, buffers = fused_triton.backward_launches(torch.empty_like(x), torch.empty_like(x), x,
                                                                   params, options)
            for launch in launches + backward:
                act = activation if "ACTIVATION" in launch.constexprs else "-"
                for config in configs.SHIPPED[(launch.kernel, configs.ca_pad(ca))]:
                    yield _Job(variant, launch.kernel, fused_triton._KERNELS[launch.kernel], launch.args,
                               launch.constexprs, config.name, config.launch_options(), label, batch, c, ca, act,
                               configs.programs_per_sm(config, _THREADS_PER_SM))
            for tokens, buf in ((x, buffers["a_buf"]), (x, buffers["dy_buf"])):
                args, meta = fused_triton.outer_product_arguments(tokens, buf, PREFIX)
                config = configs.OUTER_PRODUCT[tokens.element_size()]
                options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                yield _Job(variant, "weight_gradient", fused_triton.token_outer_product_kernel, args, meta,
                           config.name, options, label, batch, c, ca, "-", 0)


def _compile(job: _Job, target):
    """Compile `job` as the runtime would launch it: the JIT function's own argument binder
    specialises the arguments (ints equal to 1 become constants, ints and pointers divisible
    by 16 get the divisibility attribute), then the same packing and options as a launch."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    fn = job.fn
    kwargs = {**job.constexprs, **job.launch_options, "debug": bool(fn.debug or knobs.runtime.debug),
              "instrumentation_mode": knobs.compilation.instrumentation_mode}
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*job.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    key = (str(specialization), str(options))
    declared = {p.name for p in fn.params if p.is_constexpr}
    specialised = " ".join(f"{fn.arg_names[path[0]]}={value}" for path, value in constexprs.items()
                           if fn.arg_names[path[0]] not in declared)
    return key, source, options, specialised


def inspect(archs, channels=DEFAULT_CHANNELS, bottlenecks=DEFAULT_BOTTLENECKS, dtypes=("bf16", "fp16"),
            kernel_t=3, activations=DEFAULT_ACTIVATIONS, cubin_dir: Path | None = None,
            variants=None, batches=DEFAULT_BATCHES) -> list[Row]:
    """Compile every shipped config of every launch, as the launcher specialises it, for each
    architecture, and return its resource usage. dtypes "fp32/highest" and "fp32/high" compile
    float32 under that torch.get_float32_matmul_precision (plain "fp32": the current one)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter cannot compile kernels ahead of time")
    import triton
    from triton.backends.compiler import GPUTarget

    from .fused_triton import configs

    variants = configs.VARIANTS if variants is None else tuple(variants)
    rows, compiled = [], {}
    for arch in archs:
        number = _arch_number(arch)
        target = GPUTarget("cuda", number, 32)
        for dtype in dtypes:
            setting = dtype.split("/")[1] if "/" in dtype else torch.get_float32_matmul_precision()
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(setting)
            try:
                jobs = list(_jobs(number, variants, channels, bottlenecks, (dtype,), batches, kernel_t, activations))
                prepared = [(job, *_compile(job, target)) for job in jobs]
            finally:
                torch.set_float32_matmul_precision(previous)
            for job, key, source, options, specialised in prepared:
                key = (number, job.kernel, key)
                if key not in compiled:
                    binary = triton.compile(source, target=target, options=options.__dict__)
                    metadata = binary.metadata
                    wanted = {k: job.launch_options[k] for k in ("num_warps", "num_stages", "maxnreg")
                              if k in job.launch_options}
                    got = {k: getattr(metadata, k) for k in wanted}
                    if got != wanted:
                        raise AssertionError(f"{job.kernel} {job.config_name}: compiled with {got}, launched with "
                                             f"{wanted}")
                    compiled[key] = (_resource_usage(binary.asm["cubin"]), metadata.shared)
                    if cubin_dir is not None:
                        cubin_dir.mkdir(parents=True, exist_ok=True)
                        act = "" if job.activation == "-" else f"_{job.activation}"
                        name = (f"{job.kernel}_sm{number}_{job.dtype.replace('/', '-')}{act}_"
                                f"capad{configs.ca_pad(job.bottleneck)}_b{job.batch}_kt{kernel_t}_{job.config_name}")
                        (cubin_dir / f"{name}.cubin").write_bytes(binary.asm["cubin"])
                usage, shared = compiled[key]
                rows.append(Row(f"sm_{number}", job.variant, job.kernel, job.config_name, job.dtype, job.batch,
                                job.channels, job.bottleneck, kernel_t, usage.get("REG", -1), usage.get("LOCAL", 0),
                                usage.get("STACK", 0), shared, job.launch_options["num_warps"],
                                job.launch_options["num_stages"], job.programs_per_sm, specialised or "-",
                                job.activation))
    return rows


def shared_memory_fits(row: Row) -> bool:
    """A persistent kernel's programs per SM (sized by registers x threads) also fit in its
    shared memory."""
    per_sm = _ARCH_SHARED_PER_SM.get(_arch_number(row.arch), min(_ARCH_SHARED_PER_SM.values()))
    return row.programs_per_sm * row.shared_bytes <= per_sm


def format_table(rows: list[Row]) -> str:
    header = ("arch", "variant", "kernel", "config", "dtype", "act", "B", "C", "Ca", "kt", "regs", "local", "stack",
              "smem", "warps", "stages", "per_sm", "specialised", "")
    lines = [header] + [
        (r.arch, r.variant, r.kernel, r.config, r.dtype, r.activation, str(r.batch), str(r.channels),
         str(r.bottleneck), str(r.kernel_t), str(r.registers), str(r.local_bytes), str(r.stack_bytes),
         str(r.shared_bytes), str(r.warps), str(r.stages), str(r.programs_per_sm), r.specialised,
         ("SPILLS " if r.spills else "") + ("" if shared_memory_fits(r) else "SHARED>SM"))
        for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


#: What --dtypes accepts: float32 either under the current torch.get_float32_matmul_precision
#: or under a named one ("highest": tf32x3 dots, "high": tf32).
DTYPE_CHOICES = ("bf16", "fp16", "fp32", "fp32/highest", "fp32/high")


def main(argv=None) -> int:
    from .fused_triton import configs

    parser = argparse.ArgumentParser(
        prog="python -m stadapter_kernels.inspect",
        description="Compile every shipped Triton config of the ST-Adapter kernels ahead of time (no GPU needed), "
                    "specialised exactly as the launcher's calls are at run time, and print registers, spilled "
                    "bytes (LOCAL and STACK), shared memory, warps, stages and the programs per SM the launcher "
                    "sizes persistent grids by. Exits with status 1 if any config spills or its programs per SM "
                    "do not fit in the SM's shared memory.",
        epilog="Columns: regs = registers per thread; local and stack = bytes of local memory per thread "
               "(spills when above 0); smem = shared memory per program in bytes; per_sm = programs per SM by "
               "registers x threads (persistent kernels); specialised = int arguments the runtime turned into "
               "constants (each value 1: B=1 and frames_per_chunk=1 at batch 1, prefix=1). Launches with the "
               "same specialisation share one binary. Example: python -m stadapter_kernels.inspect --arch "
               "sm_80,sm_90 --dtypes bf16,fp32/highest --json usage.json --cubin-dir cubins/. Run without "
               "TRITON_INTERPRET=1.")
    parser.add_argument("--arch", default="sm_80,sm_90",
                        help="comma-separated CUDA architectures to compile for (default: %(default)s)")
    parser.add_argument("--variants", default=",".join(configs.VARIANTS),
                        help="comma-separated kernel variants (default: %(default)s)")
    parser.add_argument("--channels", type=_int_list, default=DEFAULT_CHANNELS,
                        help="comma-separated model widths C (default: 768,1024)")
    parser.add_argument("--bottlenecks", type=_int_list, default=DEFAULT_BOTTLENECKS,
                        help="comma-separated bottleneck widths Ca (default: 64,128,192,256,384)")
    parser.add_argument("--batches", type=_int_list, default=DEFAULT_BATCHES,
                        help="comma-separated videos per call B (default: 1,8; B = 1 specialises differently)")
    parser.add_argument("--dtypes", default="bf16,fp16",
                        help=f"comma-separated, from {', '.join(DTYPE_CHOICES)} (default: %(default)s)")
    parser.add_argument("--kt", type=int, default=3, choices=(1, 3, 5), help="temporal kernel size (default: 3)")
    parser.add_argument("--activation", default=",".join(DEFAULT_ACTIVATIONS),
                        help="comma-separated activations compiled in (default: %(default)s: gelu is among the "
                             "costliest in registers, relu's backward keeps a float32 bottleneck ring)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON to FILE")
    parser.add_argument("--cubin-dir", type=Path, metavar="DIR",
                        help="write each compiled cubin to DIR, named by kernel, arch, dtype, batch and config")
    args = parser.parse_args(argv)

    dtypes = tuple(args.dtypes.split(","))
    for dtype in dtypes:
        if dtype not in DTYPE_CHOICES:
            parser.error(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPE_CHOICES)}")
    variants = tuple(args.variants.split(","))
    for variant in variants:
        if variant not in configs.VARIANTS:
            parser.error(f"unknown variant {variant!r}; choose from {', '.join(configs.VARIANTS)}")
    activations = tuple(args.activation.split(","))
    for activation in activations:
        if activation not in ACTIVATIONS:
            parser.error(f"unknown activation {activation!r}; choose from {', '.join(ACTIVATIONS)}")
    rows = inspect(args.arch.split(","), args.channels, args.bottlenecks, dtypes, args.kt, activations,
                   args.cubin_dir, variants, args.batches)
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(row) | {"spills": row.spills, "shared_fits": shared_memory_fits(row)}
                                         for row in rows], indent=1))
    failing = sum(row.spills or not shared_memory_fits(row) for row in rows)
    if failing:
        print(f"{failing} row(s) spill or do not fit in shared memory", file=sys.stderr)
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
