"""Time this checkout's cpp kernels against another build of them, side by side in one process.

    PYTHONPATH=. .venv/bin/python tools/compare_builds.py OTHER [--dtypes fp32,bf16] [--bottlenecks 384,128]
        [--rounds 21] [--batch 2] [--activation identity] [--threads N]

OTHER is a git revision of this repository (its tree exported with `git archive`, e.g. the commit
before a change) or the root of another copy of it (an experiment: a worktree or a copied tree with
an edited csrc/). Its extension is built with its own setup.py under a renamed torch library
(stadapter_other) and C++ namespace (-Dstadapter=stadapter_other), so both builds load into one
process; builds of a revision are kept in --cache-dir and reused.

Machines differ and so does their load from minute to minute, so a before/after figure is only
worth something measured here, now, in one process: for each dtype and bottleneck, both builds run
the raw stadapter ops (forward; forward then backward) on the same inputs (ViT-B/16 adapter, B
videos x 8 frames x 197 tokens, C = 768, kt = 3), each call right after the same pass over 64 MiB
(caches evicted), the order of the two alternated every round; the medians over rounds are
compared. Both builds get the GEMM path and kernel copy this checkout's policy picks
(fused_cpp.native_gemm, gemm_path, avx512), where the other build's ops take those arguments (an
older build without brgemm takes its library GEMMs). Each result also gives the largest difference
between the two builds' outputs and gradients, so a change that computes something else shows.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from stadapter_kernels import fused_cpp
from stadapter_kernels.activations import ACTIVATIONS
from stadapter_kernels.spec import AdapterTensors
from tools.measure_cpp import (CHANNELS, DTYPES, FRAMES, KERNEL_T, PREFIX, TOKENS, cpu_description,
                                make_inputs)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY, OTHER_LIBRARY = "stadapter_cpp", "stadapter_other"
DEFAULT_CACHE = os.path.join(tempfile.gettempdir(), "stadapter-compare-builds")
# What building the extension reads (setup.py puts README.md in the package metadata).
BUILD_FILES = ("setup.py", "README.md", "csrc")
# The raw ops' parameter tensors (cond, passed as None, aside), in the same place in every build so
# far; the keyword flags after the options are passed only to a build whose schema has them (see op_flags).
TENSOR_ARGUMENTS = tuple(name for name in AdapterTensors._fields if name != "cond")


def export_tree(other: str, dest: str) -> None:
    """OTHER's BUILD_FILES into dest: copied from a directory, else `git archive` of a revision."""
    os.makedirs(dest)
    if os.path.isdir(other):
        for name in BUILD_FILES:
            source = os.path.join(other, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(dest, name))
            elif os.path.isfile(source):
                shutil.copy2(source, dest)
        return
    archive = subprocess.run(["git", "-C", ROOT, "archive", other, *BUILD_FILES], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"compare_builds: git archive {other} failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)


def rename_library(csrc: str) -> None:
    """TORCH_LIBRARY(stadapter_cpp, ...) -> stadapter_other in csrc/bindings.cpp, so its ops load beside ours."""
    path = os.path.join(csrc, "bindings.cpp")
    if not os.path.isfile(path):
        raise SystemExit(f"compare_builds: {path} not found: OTHER must be a stadapter tree with csrc/bindings.cpp")
    with open(path) as f:
        text = f.read()
    renamed = text.replace(f"TORCH_LIBRARY({LIBRARY},", f"TORCH_LIBRARY({OTHER_LIBRARY},").replace(
        f"TORCH_LIBRARY_IMPL({LIBRARY},", f"TORCH_LIBRARY_IMPL({OTHER_LIBRARY},")
    if renamed == text:
        raise SystemExit(f"compare_builds: no TORCH_LIBRARY({LIBRARY}, ...) in {path}")
    with open(path, "w") as f:
        f.write(renamed)


def build_other(other: str, cache_dir: str) -> str:
    """Builds OTHER's extension renamed (cached per revision) and returns the path of its library."""
    if os.path.isdir(other):
        key = "dir-" + hashlib.sha1(os.path.abspath(other).encode()).hexdigest()[:12]
    else:
        revision = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", f"{other}^{{commit}}"],
                                  capture_output=True, text=True)
        if revision.returncode != 0:
            raise SystemExit(f"compare_builds: {other!r} is neither a directory nor a git revision of {ROOT}")
        key = revision.stdout.strip()
    home = os.path.join(cache_dir, key)
    library_dir = os.path.join(home, "lib", "stadapter_kernels")

    def built_library() -> str | None:
        if not os.path.isdir(library_dir):
            return None
        names = [name for name in os.listdir(library_dir) if name.startswith("_C")]
        return os.path.join(library_dir, names[0]) if names else None

    if not os.path.isdir(other) and (cached := built_library()):
        return cached
    # A directory is copied afresh each time, its files' times kept, so that ninja recompiles only
    # what was edited since the last comparison (the renamed bindings.cpp, a small file, always).
    tree = os.path.join(home, "tree")
    shutil.rmtree(tree, ignore_errors=True)
    export_tree(other, tree)
    rename_library(os.path.join(tree, "csrc"))
    # CFLAGS reaches every compile command (setuptools adds it to the compiler's own flags).
    env = dict(os.environ, CFLAGS=f"{os.environ.get('CFLAGS', '')} -Dstadapter={OTHER_LIBRARY}".strip(),
               STADAPTER_SKIP_CPP_BUILD="0")
    print(f"building {other} in {home} ...", flush=True)
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--build-lib",
                             os.path.join(home, "lib"), "--build-temp", os.path.join(home, "temp")],
                            cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"compare_builds: building {other} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    return built_library()


def load_other(path: str):
    """The other build's ops (torch.ops.stadapter_other), after checking its C++ symbols are renamed:
    two libraries defining the same stadapter:: functions could bind one's calls to the other's."""
    if shutil.which("nm") is None:
        raise SystemExit("compare_builds: needs nm (binutils) to check the other build's symbols are renamed")
    symbols = subprocess.run(["nm", "-C", "--defined-only", path], capture_output=True, text=True).stdout
    if f"{OTHER_LIBRARY}::" not in symbols:
        raise SystemExit(f"compare_builds: {path} defines no {OTHER_LIBRARY}:: symbols: the namespace rename "
                         f"(CFLAGS=-Dstadapter={OTHER_LIBRARY}) did not reach its compile commands")
    torch.ops.load_library(path)
    return getattr(torch.ops, OTHER_LIBRARY)


def op_flags(op, flags: dict) -> dict:
    """The keyword flags `op` (an OpOverloadPacket) takes, of `flags`."""
    taken = {argument.name for argument in op.default._schema.arguments}
    return {name: value for name, value in flags.items() if name in taken}


def make_case(dtype: torch.dtype, bottleneck: int, batch: int, seed: int = 0):
    """x (B, T, L, C) and the op's parameter tensors in argument order: measure_cpp's inputs."""
    inputs = make_inputs(dtype, bottleneck, seed, batch)
    return inputs["x"].unflatten(0, (batch, FRAMES)), [inputs[name] for name in TENSOR_ARGUMENTS]


def runners(lib, x, params, activation: str, flags: dict):
    """(forward, forward then backward) of one build's raw ops; each returns its outputs."""
    forward_flags, backward_flags = op_flags(lib.st_adapter_forward, flags), op_flags(lib.st_adapter_backward, flags)
    options = (PREFIX, activation, 1.0)
    out = torch.empty_like(x)

    def forward():
        lib.st_adapter_forward(out, x, *params, None, *options, **forward_flags)
        return [out]

    def forward_backward():
        forward()
        dx = torch.empty_like(x)
        grads = lib.st_adapter_backward(dx, x, x, *params, None, *options, **backward_flags)  # grad_out = x
        return [out, dx, *grads]

    return forward, forward_backward


def largest_difference(ours, theirs) -> float:
    """max |ours - theirs| over matching outputs, relative to the largest |ours| of each."""
    worst = 0.0
    for a, b in zip(ours, theirs):
        if a is None or b is None or a.numel() == 0:
            continue
        scale = a.float().abs().max().item() or 1.0
        worst = max(worst, (a.float() - b.float()).abs().max().item() / scale)
    return worst


def compare(ours, theirs, rounds: int) -> tuple[float, float]:
    """Medians (s) of `ours` and `theirs`, each call after the same cache eviction, order alternated."""
    flush = torch.empty(64 << 20, dtype=torch.uint8)
    samples = {0: [], 1: []}
    candidates = (ours, theirs)
    for fn in candidates:
        fn()  # warm-up: arenas, GEMM primitives
    for round_index in range(rounds):
        for which in ((0, 1) if round_index % 2 == 0 else (1, 0)):
            flush.add_(1)
            start = time.perf_counter()
            candidates[which]()
            samples[which].append(time.perf_counter() - start)
    return statistics.median(samples[0]), statistics.median(samples[1])


def run_comparison(other_lib, dtype_names, bottlenecks, rounds, batch, activation, label):
    """Prints both builds' medians and other / ours per dtype, bottleneck and phase."""
    for dtype_name in dtype_names:
        dtype = DTYPES[dtype_name]
        for bottleneck in bottlenecks:
            x, params = make_case(dtype, bottleneck, batch)
            path = fused_cpp.gemm_path(dtype, CHANNELS, bottleneck)
            flags = dict(tile_patches=0, native_gemm=fused_cpp.native_gemm.get(dtype, False),
                         brgemm=path.startswith("brgemm"), residual=True, avx512=fused_cpp.avx512)
            ours = runners(torch.ops.stadapter_cpp, x, params, activation, flags)
            theirs = runners(other_lib, x, params, activation, flags)
            for phase, ours_fn, theirs_fn in (("fwd", ours[0], theirs[0]), ("fwd+bwd", ours[1], theirs[1])):
                difference = largest_difference([t.clone() for t in ours_fn()], theirs_fn())
                mine, other = compare(ours_fn, theirs_fn, rounds)
                print(f"{dtype_name} Ca={bottleneck} {phase:8s} this checkout {mine * 1e3:8.2f} ms   {label} "
                      f"{other * 1e3:8.2f} ms   {label} / this checkout = {other / mine:.3f}   "
                      f"[{path}; outputs differ by {difference:.1e} relative]", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("other", help="a git revision of this repository, or the root of another copy of it")
    parser.add_argument("--dtypes", default="fp32,bf16", help="of " + ",".join(DTYPES) + " (default %(default)s)")
    parser.add_argument("--bottlenecks", default="384,128", help="Ca values (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per case (default %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="videos B of 8 frames (default %(default)s)")
    parser.add_argument("--activation", default="identity", choices=tuple(ACTIVATIONS),
                        help="(default %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE, help="where builds of revisions are kept "
                                                                   "(default %(default)s)")
    args = parser.parse_args()
    dtype_names = args.dtypes.split(",")
    unknown = [name for name in dtype_names if name not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {','.join(unknown)}; expected some of {','.join(DTYPES)}")
    if args.rounds < 1 or args.batch < 1:
        parser.error("--rounds and --batch must be at least 1")
    if not hasattr(torch.ops.stadapter_cpp, "st_adapter_forward"):
        raise SystemExit("compare_builds: this checkout's extension is not built (`make extension`)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    other_lib = load_other(build_other(args.other, args.cache_dir))
    print(f"CPU: {cpu_description()}")
    print(f"threads={torch.get_num_threads()} B={args.batch} T={FRAMES} L={TOKENS} C={CHANNELS} kt={KERNEL_T} "
          f"activation={args.activation}, medians of {args.rounds} rounds, each call after a 64 MiB eviction")
    run_comparison(other_lib, dtype_names, [int(c) for c in args.bottlenecks.split(",")], args.rounds, args.batch,
                   args.activation, args.other)


if __name__ == "__main__":
    main()
