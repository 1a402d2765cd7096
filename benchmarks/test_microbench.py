"""pytest-benchmark wrappers of the micro modes: `pytest benchmarks --benchmark-only`.

One test per provider and mode on the quick sweep's shapes (config.QUICK) of the best device
here; an unavailable provider is skipped with its reason. `make test` runs tests/ only, so these
never slow the test suite down; the runner (`python -m benchmarks`) is the full-featured path.
"""

import itertools

import pytest
import torch

from benchmarks import config
from benchmarks.providers import Shape, Unavailable, micro_case

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SWEEP = config.QUICK[DEVICE]
SHAPES = [
    (Shape(B=max(1, config.FRAMES_PER_BATCH[DEVICE] // t), T=t, L=config.TOKENS, C=config.WIDTHS[w], Ca=ca), d)
    for d, w, ca, t in itertools.product(SWEEP.dtype, SWEEP.width, SWEEP.ca, SWEEP.T)
]


@pytest.mark.parametrize("shape,dtype_name", SHAPES, ids=[f"{s.label().replace(' ', '-')}-{d}" for s, d in SHAPES])
@pytest.mark.parametrize("mode", config.MICRO_MODES)
@pytest.mark.parametrize("provider", config.PROVIDERS)
def test_micro(benchmark, provider, mode, shape, dtype_name):
    try:
        case = micro_case(provider, mode, shape, config.DTYPES[dtype_name], DEVICE)
    except Unavailable as why:
        pytest.skip(f"{provider} unavailable: {why}")
    case.run()  # compiles (compile) outside the measurement
    benchmark.group = f"{mode} {shape.label()} {dtype_name}"
    benchmark.extra_info.update(backend=case.backend, notes="; ".join(case.notes), tokens=shape.tokens)
    if DEVICE == "cuda":
        benchmark.pedantic(lambda: (case.run(), torch.cuda.synchronize()), rounds=50, warmup_rounds=5)
    else:
        benchmark.pedantic(case.run, rounds=10, warmup_rounds=1)
