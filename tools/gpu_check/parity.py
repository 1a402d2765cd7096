"""Step 1: the Triton parity suite on CUDA, real kernels against the float64 oracle.

The cases are the interpreter tests' own (`tests/triton/test_parity.py`: CASES, and BASE with
every activation), read from that file so there is one source of truth, plus the ViT-B/16
adapter shape the interpreter is too slow for. Every case runs through `tests/parity.py`'s
`assert_matches_oracle`: output and every gradient, NaN-poisoned allocations, DESIGN.md's
tolerances. float32 cases run twice, under torch's "highest" float32 matmul precision (the
float32 tolerance), and the base and ViT-B cases also under "high" (tf32 and its tolerance);
each case runs for every Triton variant (`configs.VARIANTS`, forced with `configs.forced`).
On a GPU the cases are spread over `--jobs` processes, mostly to compile their kernels in
parallel.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import multiprocessing
import sys
import time
import traceback
from pathlib import Path

import torch

import stadapter_kernels as sk
from stadapter_kernels.fused_triton import configs

from .results import budget_exhausted

REPO = Path(__file__).resolve().parents[2]
TEST_CASES = REPO / "tests" / "triton" / "test_parity.py"
#: DESIGN.md: "float32 <= 1e-5 (tf32 on GPU: <= 5e-4)"; tests/parity.py has the rest.
TF32_TOLERANCE = 5e-4
#: A dry run (the interpreter, on CPU) checks the machinery on one small float32 case; the
#: interpreter takes seconds per case.
DRY_RUN_CASES = ("T1",)
#: float32 cases run under torch's default float32 matmul precision, "highest" (accurate dots);
#: these also under "high" (tf32): the base case and the ViT-B shape, whose K = 768 dots are
#: where tf32's error shows.
ALL_FLOAT32_PRECISIONS = ("highest", "high")
BOTH_PRECISIONS = ("fp32", "vit_b_fp32", *DRY_RUN_CASES)


def harness():
    """tests/parity.py, the parity harness every backend's tests use (tests/ is not a package)."""
    tests = str(REPO / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import parity

    return parity


@functools.cache
def test_definitions() -> dict:
    """The module-level definitions of tests/triton/test_parity.py, evaluated without pytest
    (the lent machine may not have it): its imports other than pytest, its assignments and its
    helpers, but none of its test functions."""
    parity = harness()
    tree = ast.parse(TEST_CASES.read_text(), str(TEST_CASES))

    def wanted(node) -> bool:
        if isinstance(node, ast.Import):
            return all(alias.name != "pytest" for alias in node.names)
        if isinstance(node, ast.ImportFrom):
            return node.module != "pytest"
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return not node.name.startswith(("test", "Test"))
        return isinstance(node, (ast.Assign, ast.AnnAssign))

    namespace = {"torch": torch, "parity": parity}
    module = ast.Module(body=[node for node in tree.body if wanted(node)], type_ignores=[])
    exec(compile(module, str(TEST_CASES), "exec"), namespace)
    return namespace


def cases(dry_run: bool) -> dict:
    """name -> parity.Case, most telling first (a run cut off at the time box keeps those): the
    ViT-B/16 adapter in every dtype, the interpreter tests' cases, BASE with every activation in
    every dtype."""
    definitions = test_definitions()
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    named = {f"vit_b_{dtype_name}": definitions["Case"](
        batch=1, frames=8, tokens=197, channels=768, bottleneck=384, kernel_t=3, prefix=1, activation="gelu",
        cond=True, dtype=dtype) for dtype_name, dtype in dtypes.items()}
    named.update(definitions["CASES"])
    base = definitions["BASE"]
    for activation in definitions["ACTIVATIONS"]:
        for dtype_name, dtype in dtypes.items():
            named[f"{activation}_{dtype_name}"] = base.with_(activation=activation, batch=1, dtype=dtype)
    if dry_run:
        named = {name: named[name] for name in DRY_RUN_CASES}
    return named


def plan(dry_run: bool) -> list[tuple[str, str, str | None]]:
    """(variant, case name, float32 precision or None) for every item, in the order of `cases`,
    each case for every variant."""
    items = []
    for name, case in cases(dry_run).items():
        precisions = (None,)
        if case.dtype == torch.float32:
            precisions = ALL_FLOAT32_PRECISIONS if name in BOTH_PRECISIONS else ("highest",)
        items += [(variant, name, precision) for precision in precisions for variant in configs.VARIANTS]
    if dry_run:  # each variant with one of the precisions: both code paths, half the interpreter's time
        items = [item for item in items
                 if configs.VARIANTS.index(item[0]) % len(ALL_FLOAT32_PRECISIONS) == ALL_FLOAT32_PRECISIONS.index(item[2])]
    return items


def item_name(variant: str, case_name: str, precision: str | None) -> str:
    return f"{variant}/{case_name}" + (f"/{precision}" if precision else "")


def run_item(variant: str, case_name: str, precision: str | None, dry_run: bool) -> dict:
    """One case against the oracle; in a worker process of its own on a GPU."""
    parity = harness()
    case = cases(dry_run)[case_name]
    device = "cpu" if dry_run else "cuda"
    tolerance = TF32_TOLERANCE if precision == "high" else parity.TOLERANCE[case.dtype]
    started = time.time()
    previous = torch.get_float32_matmul_precision()
    notes = []
    try:
        if precision:
            torch.set_float32_matmul_precision(precision)
        with configs.forced(variant=variant):
            # explain's notes say which variant ran and how float32 dots ran.
            notes = list(parity.call(sk.explain, parity.make_inputs(case, device, seed=0), case, backend="triton").notes)
            errors = parity.assert_matches_oracle(case, backend="triton", device=device, tolerance=tolerance)
    except AssertionError as failure:
        return {"status": "fail", "detail": str(failure)[:2000], "tolerance": tolerance, "explain": notes,
                "seconds": round(time.time() - started, 2)}
    finally:
        torch.set_float32_matmul_precision(previous)
    worst = max(errors, key=errors.get)
    return {"status": "pass", "detail": f"worst {worst} {errors[worst]:.2e} <= {tolerance:g}",
            "errors": errors, "tolerance": tolerance, "explain": notes, "case": repr(case),
            "seconds": round(time.time() - started, 2)}


def _guarded_item(spec) -> dict:
    try:
        return run_item(*spec)
    except Exception as error:  # one broken case must not hide the others
        return {"status": "error", "detail": f"{type(error).__name__}: {error}"[:2000],
                "traceback": traceback.format_exc(limit=8)}


#: What `in_processes` yields for a spec that did not run before the time ran out.
NOT_RUN = object()


def in_processes(function, specs: list, jobs: int, seconds_left):
    """Yield (index, result) for every spec as `function(spec)` finishes, in `jobs` spawned
    processes (one: in this process), until `seconds_left()` reaches 0; then (index, NOT_RUN)
    for each spec that has not finished, whose processes are stopped. A result is the
    exception instead where a process died (BrokenProcessPool)."""
    if jobs <= 1:
        for index, spec in enumerate(specs):
            if seconds_left() <= 0:
                yield from ((rest, NOT_RUN) for rest in range(index, len(specs)))
                return
            yield index, function(spec)
        return
    # spawn, not fork: the children use CUDA.
    pool = concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))
    futures = {pool.submit(function, spec): index for index, spec in enumerate(specs)}
    try:
        for future in concurrent.futures.as_completed(futures, timeout=max(0.0, seconds_left())):
            try:
                yield futures[future], future.result()
            except Exception as error:
                yield futures[future], error
    except concurrent.futures.TimeoutError:
        yield from sorted((index, NOT_RUN) for future, index in futures.items() if not future.done())
        pool.shutdown(wait=False, cancel_futures=True)
        for child in multiprocessing.active_children():  # the pool's processes, still busy with a spec
            child.terminate()
    pool.shutdown(wait=True)


def run(context) -> None:
    items = plan(context.dry_run)
    context.document["planned"] = [item_name(*spec) for spec in items]
    specs = [(*spec, context.dry_run) for spec in items]
    not_run = []
    for index, result in in_processes(_guarded_item, specs, context.jobs, context.time_left):
        if result is NOT_RUN:
            not_run.append(item_name(*items[index]))
            continue
        if isinstance(result, Exception):  # its process died, and with it the pool
            result = {"status": "error", "detail": f"{type(result).__name__}: {result}"}
        context.add({"name": item_name(*items[index]), **result})
    if not_run:
        context.skip_rest(not_run, budget_exhausted(context))
    # Items in plan order, whatever order the processes finished in.
    order = {name: i for i, name in enumerate(context.document["planned"])}
    context.document["items"].sort(key=lambda item: order.get(item["name"], len(order)))
    items_done = context.document["items"]
    context.document["findings"] = {"cases": len(items), "passed": sum(i["status"] == "pass" for i in items_done),
                                    "failed": [i["name"] for i in items_done if i["status"] in ("fail", "error")]}
    context.save()
