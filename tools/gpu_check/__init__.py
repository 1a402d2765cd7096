"""The prepared GPU check (issue 17): everything a lent GPU must tell us, in one command.

    STADAPTER_SKIP_CPP_BUILD=1 PYTHONPATH=. python3 -m tools.gpu_check --out "$OUT"     # on a CUDA machine
    PYTHONPATH=. python3 -m tools.gpu_check --dry-run --out /tmp/gpu-check              # on CPU, for CI

A GPU is lent for about 15 minutes of device time, start-up included, so the check runs
unattended in under 8 minutes and leaves everything as files in one flat folder. Its steps run
in order in a worker process, each with a hard time box enforced by the parent (which kills
the worker and starts a new one at the next step), and each writes its result file before
the next starts, so a run cut off anywhere still returns what it did:

    0-environment.json   device, driver, torch/triton versions, measured HBM and GEMM peaks
    1-parity.json        the Triton parity cases on CUDA against the float64 oracle
    2-bench.json         the benchmark's quick sweep (do_bench) and its roofline, measured
    3-gpu-only.json      what only a GPU can show (bit-equality, B sweep, ring, profiler, int64, graphs)
    summary.json         every step's status and findings, and the environment
    summary.md           the same as markdown tables
    log.txt              the workers' output

`--dry-run` runs the same steps on CPU in the Triton interpreter with tiny shapes, so CI
proves the check itself works; its numbers mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Step:
    """One step of the check: the module that runs it, its result file and its time box."""

    name: str
    module: str  # tools.gpu_check.<module>.run(context) does the work
    filename: str
    budget_s: float  # hard limit, worker start-up included for the first step of a worker


#: The steps in the order they run. The budgets add up to 435 s, leaving room in the 8 minutes
#: for a worker restart after a time-out and the summary.
STEPS = (
    Step("environment", "environment", "0-environment.json", 45),
    Step("parity", "parity", "1-parity.json", 150),
    Step("bench", "bench", "2-bench.json", 120),
    Step("gpu_only", "gpu_only", "3-gpu-only.json", 120),
)
SUMMARY_JSON = "summary.json"
SUMMARY_MARKDOWN = "summary.md"
LOG = "log.txt"
#: The whole check, summary included, must end within this (the issue's 8 minutes, less a margin).
TOTAL_BUDGET_S = 465


def scaled_steps(time_limit_s: float) -> tuple[Step, ...]:
    """STEPS with every time box scaled to a whole check of `time_limit_s` (a shorter lease)."""
    return tuple(replace(step, budget_s=step.budget_s * time_limit_s / TOTAL_BUDGET_S) for step in STEPS)
