"""The worker process: runs the steps from a given one on, in order, in one process.

    python -m tools.gpu_check.worker --out DIR --status FILE --from-step K --window-start EPOCH [--dry-run]

Started by the parent (`python -m tools.gpu_check`), which reads the progress lines this
appends to FILE ("START k epoch", "DONE k epoch") and kills the worker when a step overruns
its time box. A step that raises is recorded in its file and the next step still runs. With
--dry-run the parent has set TRITON_INTERPRET=1, which must be in the environment before
triton is first imported; this checks it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

from . import TOTAL_BUDGET_S, scaled_steps
from .results import StepContext


def mark(status_path: str, event: str, index: int) -> None:
    with open(status_path, "a") as handle:
        handle.write(f"{event} {index} {time.time():.3f}\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--status", required=True)
    parser.add_argument("--from-step", type=int, default=0)
    parser.add_argument("--window-start", type=float, required=True, help="when the first step's time box began")
    parser.add_argument("--jobs", type=int, default=1, help="processes for the parity cases")
    parser.add_argument("--time-limit", type=float, default=TOTAL_BUDGET_S, help="the whole check's time box")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("a dry run needs TRITON_INTERPRET=1 in the environment before triton is imported")
    steps = scaled_steps(args.time_limit)
    window_start = args.window_start
    for index in range(args.from_step, len(steps)):
        step = steps[index]
        mark(args.status, "START", index)
        print(f"== step {index} {step.name} (time box {step.budget_s:.0f} s)", flush=True)
        context = StepContext(step, args.out, args.dry_run, window_start, args.jobs)
        context.save()
        try:
            importlib.import_module(f"{__package__}.{step.module}").run(context)
        except Exception as error:  # recorded in the step's file; the next step still runs
            context.finish(error)
            print(context.document["error"], file=sys.stderr, flush=True)
        else:
            context.finish()
        print(f"== step {index} {step.name}: {context.document['status']} in {context.document['elapsed_s']:.1f} s",
              flush=True)
        mark(args.status, "DONE", index)
        window_start = time.time()
    return 0


if __name__ == "__main__":
    sys.exit(main())
