"""Result files: one JSON document per step, rewritten after every item so a cut-off step
still leaves what it did, and written atomically so a kill never leaves half a file.

A document is {"step", "status", "dry_run", "started", "elapsed_s", "items": [...], ...}; each
item is a dict with at least "name" and "status" (one of ITEM_STATUSES) and, where it is not
a pass, a "detail" saying why.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback

from . import STEPS

#: pass/fail: a check with a verdict; measured: a number without one; skipped: not run (the
#: step's time box, a dry run); unavailable: this build or machine lacks what it needs;
#: error: the check itself raised.
ITEM_STATUSES = ("pass", "fail", "measured", "skipped", "unavailable", "error")
#: complete: ran to its end; error: raised; timed_out: killed at its time box; crashed: the
#: worker died; not_run: the whole check's time was spent before it started.
STEP_STATUSES = ("running", "complete", "error", "timed_out", "crashed", "not_run")
#: Seconds a step keeps back from its time box for its last item and the final write.
RESERVE_S = 12.0


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path: str, document: dict) -> None:
    """Write `document` to `path` atomically (a temporary file renamed over it)."""
    temporary = f"{path}.partial"
    with open(temporary, "w") as handle:
        json.dump(document, handle, indent=1, default=str)
        handle.write("\n")
    os.replace(temporary, path)


def read_json(path: str) -> dict | None:
    """The document at `path`, or None when it is missing or unreadable."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def environment_document(out_dir: str) -> dict:
    """Step 0's document (device, versions, measured peaks), or {} where it wrote none."""
    return read_json(os.path.join(out_dir, STEPS[0].filename)) or {}


class StepContext:
    """What a step's `run(context)` gets: where to write, the mode, its soft deadline and its
    document, which `add` and `save` write out."""

    def __init__(self, step, out_dir: str, dry_run: bool, window_start: float, jobs: int):
        self.step, self.out_dir, self.dry_run, self.jobs = step, out_dir, dry_run, jobs
        self.path = os.path.join(out_dir, step.filename)
        self.started = time.time()
        self.deadline = window_start + step.budget_s - RESERVE_S
        self.document = {"step": step.name, "status": "running", "dry_run": dry_run, "started": utc_now(),
                         "budget_s": step.budget_s, "elapsed_s": 0.0, "items": []}

    @property
    def device(self) -> str:
        return "cpu" if self.dry_run else "cuda"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def add(self, item: dict) -> dict:
        assert item["status"] in ITEM_STATUSES, item
        self.document["items"].append(item)
        self.save()
        return item

    def skip_rest(self, names, why: str) -> None:
        for name in names:
            self.document["items"].append({"name": name, "status": "skipped", "detail": why})
        self.save()

    def save(self) -> None:
        self.document["elapsed_s"] = round(time.time() - self.started, 2)
        write_json(self.path, self.document)

    def finish(self, error: BaseException | None = None) -> None:
        if error is None:
            self.document["status"] = "complete"
        else:
            self.document.update(status="error", error="".join(traceback.format_exception(error)))
        self.save()


def budget_exhausted(context: StepContext) -> str:
    return f"skipped: the step's time box ({context.step.budget_s:.0f} s) was nearly spent"


def guarded(context: StepContext, name: str, check, *args, **kwargs) -> dict:
    """Run one item's check and record it; a check that raises is recorded as an error item
    (with its exception), so one broken check does not cost the rest of the step."""
    start = time.time()
    try:
        item = check(*args, **kwargs)
    except Exception as error:  # report and go on: a GPU check may fail in any way
        item = {"status": "error", "detail": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(limit=8)}
    item = {"name": name, **item, "seconds": round(time.time() - start, 2)}
    return context.add(item)
