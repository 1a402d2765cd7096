"""`python -m tools.gpu_check`: run every step of the GPU check in a time-boxed worker, then
write the summary. See the package docstring for the files it writes.

    STADAPTER_SKIP_CPP_BUILD=1 PYTHONPATH=. python3 -m tools.gpu_check --out "$OUT"
    PYTHONPATH=. python3 -m tools.gpu_check --dry-run --out /tmp/gpu-check

Exit status: 0 when every step ran to its end and no check failed, 1 otherwise, 2 when there
is no CUDA device (and no --dry-run): then it stops at once, before any step.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import LOG, SUMMARY_JSON, SUMMARY_MARKDOWN, TOTAL_BUDGET_S, scaled_steps
from . import summary
from .results import read_json, utc_now, write_json

REPO = Path(__file__).resolve().parents[2]
#: How often the parent looks at the worker's progress.
POLL_S = 0.25
#: log.txt is cut to its head and tail beyond this, so it stays small enough to come back.
LOG_LIMIT_BYTES = 1 << 20
#: How long a worker that has finished every step may take to exit.
EXIT_GRACE_S = 30


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tools.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join("bench-results", "gpu-check"),
                        help="folder for the result files (default: $OUT, else bench-results/gpu-check, which git ignores)")
    parser.add_argument("--dry-run", action="store_true",
                        help="run every step on CPU in the Triton interpreter with tiny shapes (for CI)")
    parser.add_argument("--time-limit", type=float, default=TOTAL_BUDGET_S, metavar="SECONDS",
                        help="the whole check's time box; every step's is scaled with it (default: %(default)s)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes running the parity cases (default: the cores less two, at most 14, on a GPU; 1 in a dry run)")
    return parser


def read_events(status_path: str) -> list[tuple[str, int, float]]:
    """The worker's progress lines so far: (START | DONE, step index, epoch)."""
    try:
        with open(status_path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return []
    events = []
    for line in lines:
        parts = line.split()
        if len(parts) == 3:  # a line being written has fewer parts; it is read on the next poll
            events.append((parts[0], int(parts[1]), float(parts[2])))
    return events


class Terminated(Exception):
    """The check itself was told to stop (SIGTERM, e.g. by the lent machine's time limit)."""


def on_terminate(signum, frame) -> None:
    raise Terminated(signal.Signals(signum).name)


def stop(process: subprocess.Popen) -> None:
    """Kill the worker and every process it started (its own session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def orchestrate(steps, launch, status_path: str, deadline: float) -> dict[int, tuple[str, str]]:
    """Run `steps` through workers started by `launch(first_index, window_start)`, each step
    within its time box and all before `deadline`.

    A worker runs the steps from `first_index` on and reports each one's end ("DONE"); a step's
    time box starts when the one before it ended (for a worker's first step: at its launch, so
    the imports count). When a step overruns, or the worker dies, the worker is stopped and a
    new one starts at the next step. Returns the steps that did not end normally:
    {index: (status, reason)}, status timed_out, crashed or not_run.
    """
    outcome: dict[int, tuple[str, str]] = {}
    index = 0
    while index < len(steps):
        if time.time() >= deadline:
            for left in range(index, len(steps)):
                outcome[left] = ("not_run", "the whole check's time box was spent before this step")
            break
        window_start = time.time()
        seen = len(read_events(status_path))
        process = launch(index, window_start)
        current, current_start, killed = index, window_start, False

        def take_events():
            nonlocal seen, current, current_start
            events = read_events(status_path)
            for event, step_index, at in events[seen:]:
                if event == "DONE":
                    current, current_start = step_index + 1, at
            seen = len(events)

        try:
            while process.poll() is None:
                take_events()
                if current >= len(steps):
                    break
                budget = steps[current].budget_s
                if time.time() > min(current_start + budget, deadline):
                    stop(process)
                    killed = True
                    outcome[current] = ("timed_out", f"killed at its time box of {budget:.0f} s"
                                        if current_start + budget <= deadline
                                        else "killed when the whole check's time box ran out")
                    break
                time.sleep(POLL_S)
        except Terminated as signal_name:  # stop the worker too, and say so in the files
            stop(process)
            take_events()
            for left in range(current, len(steps)):
                outcome[left] = ("timed_out" if left == current else "not_run", f"the check got {signal_name}")
            return outcome
        try:
            process.wait(timeout=max(1.0, min(EXIT_GRACE_S, deadline - time.time())))
        except subprocess.TimeoutExpired:  # every step is done but the worker hangs on its way out
            stop(process)
        if not killed:
            take_events()
            if current < len(steps):
                outcome[current] = ("crashed", f"the worker exited with status {process.returncode} during this step")
        index = current + 1
    return outcome


def record_outcome(out_dir: str, steps, outcome: dict[int, tuple[str, str]]) -> None:
    """Mark the steps that did not end normally in their files, keeping what they wrote."""
    for index, (status, reason) in outcome.items():
        step = steps[index]
        path = os.path.join(out_dir, step.filename)
        document = read_json(path) or {"step": step.name, "started": None, "items": []}
        document.update(status=status, reason=reason, recorded=utc_now())
        write_json(path, document)


def cap_log(path: str, limit: int = LOG_LIMIT_BYTES) -> None:
    """Keep the first quarter and the last three quarters of `limit` bytes of a longer log."""
    size = os.path.getsize(path)
    if size <= limit:
        return
    with open(path, "rb") as handle:
        head = handle.read(limit // 4)
        handle.seek(size - (limit - limit // 4))
        tail = handle.read()
    with open(path, "wb") as handle:
        handle.write(head + f"\n[... {size - limit} bytes cut ...]\n".encode() + tail)


def worker_environment(dry_run: bool, scratch: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    # parity.py's NaN poisoning turns on torch's deterministic mode, under which cuBLAS
    # refuses to run without a fixed workspace; it must be set before CUDA starts.
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if dry_run:
        env["TRITON_INTERPRET"] = "1"  # before triton is first imported, hence in the worker's environment
    else:
        env.pop("TRITON_INTERPRET", None)
    # Triton caches compiled kernels under ~/.triton, shared by the workers and the parity
    # processes (and kept for a rerun on a machine still warm); where home is not writable, in
    # this run's scratch folder instead.
    home_cache = Path.home() / ".triton"
    writable = os.access(home_cache if home_cache.exists() else Path.home(), os.W_OK)
    if "TRITON_CACHE_DIR" not in env and not writable:
        env["TRITON_CACHE_DIR"] = os.path.join(scratch, "triton-cache")
    return env


def cuda_missing_reason() -> str | None:
    try:
        import torch
    except ImportError as error:
        return f"torch cannot be imported ({error})"
    if not torch.cuda.is_available():
        return (f"no CUDA device is visible to torch {torch.__version__} (CUDA build: {torch.version.cuda}); "
                "this check needs a GPU; `--dry-run` runs its steps on CPU")
    return None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    deadline = started + args.time_limit
    steps = scaled_steps(args.time_limit)
    if not args.dry_run:
        reason = cuda_missing_reason()
        if reason:
            print(f"gpu_check: {reason}", file=sys.stderr)
            return 2
    # Parity cases mostly compile kernels, one core each: all cores but two for the GPU's own work.
    jobs = args.jobs or (1 if args.dry_run else min(14, max(1, (os.cpu_count() or 2) - 2)))
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    # Files of an earlier run would be mistaken for this one's.
    for name in [s.filename for s in steps] + [SUMMARY_JSON, SUMMARY_MARKDOWN, LOG]:
        Path(out_dir, name).unlink(missing_ok=True)
    print(f"gpu_check: {'dry run on CPU' if args.dry_run else 'on CUDA'}, results in {out_dir}, "
          f"whole check within {args.time_limit:.0f} s", flush=True)

    signal.signal(signal.SIGTERM, on_terminate)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as scratch, open(os.path.join(out_dir, LOG), "a") as log:
        status_path = os.path.join(scratch, "status")
        env = worker_environment(args.dry_run, scratch)

        def launch(first_index: int, window_start: float) -> subprocess.Popen:
            command = [sys.executable, "-m", "tools.gpu_check.worker", "--out", out_dir, "--status", status_path,
                       "--from-step", str(first_index), "--window-start", repr(window_start), "--jobs", str(jobs),
                       "--time-limit", repr(args.time_limit)]
            if args.dry_run:
                command.append("--dry-run")
            log.write(f"== {utc_now()} worker from step {first_index}: {' '.join(command)}\n")
            log.flush()
            return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

        outcome = orchestrate(steps, launch, status_path, deadline - summary.RESERVE_S)
    record_outcome(out_dir, steps, outcome)
    cap_log(os.path.join(out_dir, LOG))
    document = summary.write(out_dir, steps, time.time() - started)
    print(summary.console_lines(document), flush=True)
    return 0 if document["verdict"] == "pass" else 1


if __name__ == "__main__":
    sys.exit(main())
