"""The GPU check (tools/gpu_check) without a GPU: its dry run end to end, the refusal to run
without CUDA, the parent's time boxes, the summary, and that it reads the Triton tests' cases."""

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import gpu_check
from tools.gpu_check import __main__ as parent
from tools.gpu_check import parity as parity_step
from tools.gpu_check import summary
from tools.gpu_check.results import ITEM_STATUSES, read_json, write_json

REPO = Path(__file__).resolve().parents[1]
RESULT_FILES = {*(s.filename for s in gpu_check.STEPS), gpu_check.SUMMARY_JSON, gpu_check.SUMMARY_MARKDOWN,
                gpu_check.LOG}


def _run_check(out: Path, *options, env=None, timeout=300):
    environment = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    environment.pop("TRITON_INTERPRET", None)  # the check sets it for its own workers
    return subprocess.run([sys.executable, "-m", "tools.gpu_check", "--out", str(out), *options], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def test_dry_run_writes_every_result_file(tmp_path):
    out = tmp_path / "results"
    started = time.time()
    result = _run_check(out, "--dry-run")
    elapsed = time.time() - started
    log = (out / gpu_check.LOG).read_text() if (out / gpu_check.LOG).exists() else ""
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{log[-6000:]}"

    # What the lent machine sends back: at most 8 files, flat.
    assert {p.name for p in out.iterdir()} == RESULT_FILES and len(RESULT_FILES) <= 8
    assert all(p.is_file() for p in out.iterdir())
    documents = {step.name: read_json(str(out / step.filename)) for step in gpu_check.STEPS}
    for name, document in documents.items():
        assert document["status"] == "complete" and document["dry_run"], (name, document.get("error"))
        assert document["items"], name
        for item in document["items"]:
            assert item["status"] in ITEM_STATUSES and item["status"] not in ("fail", "error"), (name, item)

    environment = documents["environment"]["summary"]
    import torch
    import triton
    assert environment["torch"] == torch.__version__ and environment["triton"] == triton.__version__
    assert documents["environment"]["peaks"]["bandwidth"] > 0

    from stadapter_kernels.fused_triton import configs
    parity_items = documents["parity"]["items"]
    assert {item["name"].split("/")[0] for item in parity_items} == set(configs.VARIANTS)
    assert all(item["status"] == "pass" and item["errors"] for item in parity_items)
    # Each item ran the variant it names, as explain says.
    assert all(any(f"variant {item['name'].split('/')[0]} " in note for note in item["explain"]) for item in parity_items)

    records = documents["bench"]["records"]
    fused = [r for r in records if r["provider"] == "fused"]
    assert fused and all(r["status"] == "ok" and r["backend"] == "triton" for r in fused)
    assert all(r["roofline_device"]["measured_over_device_floor"] > 0 for r in records if r["time"])

    checks = {item["name"].rsplit(" ", 1)[0] for item in documents["gpu_only"]["items"]}
    assert {"bit-equality fused", "batch sweep bfloat16", "auto", "ring footprint", "kernels under the profiler",
            "int64 offsets", "CUDA graph warm", "CUDA graph cold"} <= checks
    assert set(documents["gpu_only"]["findings"]["auto_variant"].values()) <= set(configs.VARIANTS)

    document = read_json(str(out / gpu_check.SUMMARY_JSON))
    assert document["verdict"] == "pass" and document["dry_run"]
    assert [s["name"] for s in document["steps"]] == [s.name for s in gpu_check.STEPS]
    markdown = (out / gpu_check.SUMMARY_MARKDOWN).read_text()
    assert "DRY RUN" in markdown and torch.__version__ in markdown and triton.__version__ in markdown
    for step in gpu_check.STEPS:
        assert f"## {step.name} (complete)" in markdown
    print(f"dry run: {elapsed:.0f} s")


def test_without_cuda_it_stops_at_once(tmp_path):
    out = tmp_path / "results"
    result = _run_check(out, env={"CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert result.returncode == 2
    assert "no CUDA device" in result.stderr and "--dry-run" in result.stderr
    assert not out.exists() or not any(out.iterdir())


# The parent's time boxes, with a stand-in worker that follows the worker's protocol -------------

FAKE_WORKER = """
import sys, time
first, status, behaviour = int(sys.argv[1]), sys.argv[2], dict(a.split("=") for a in sys.argv[3:])
for index in range(first, int(behaviour["steps"])):
    with open(status, "a") as f:
        f.write(f"START {index} {time.time()}\\n")
    if behaviour.get("hang") == str(index):
        time.sleep(60)
    if behaviour.get("crash") == str(index):
        sys.exit(3)
    with open(status, "a") as f:
        f.write(f"DONE {index} {time.time()}\\n")
"""


def _orchestrate(tmp_path, deadline_s=30.0, budget_s=2.0, **behaviour):
    steps = tuple(gpu_check.Step(f"s{i}", "unused", f"{i}.json", budget_s=budget_s) for i in range(4))
    status = str(tmp_path / "status")
    launches = []

    def launch(first, window_start):
        launches.append(first)
        options = [f"{k}={v}" for k, v in {"steps": len(steps), **behaviour}.items()]
        return subprocess.Popen([sys.executable, "-c", FAKE_WORKER, str(first), status, *options],
                                start_new_session=True)

    started = time.time()
    outcome = parent.orchestrate(steps, launch, status, started + deadline_s)
    return outcome, launches, time.time() - started, status


def test_a_step_past_its_time_box_is_killed_and_the_next_one_runs(tmp_path):
    outcome, launches, elapsed, status = _orchestrate(tmp_path, hang=1)
    assert outcome == {1: ("timed_out", "killed at its time box of 2 s")}
    assert launches == [0, 2]
    assert [i for event, i, _ in parent.read_events(status) if event == "DONE"] == [0, 2, 3]
    assert elapsed < 10


def test_a_crashed_worker_is_replaced_at_the_next_step(tmp_path):
    outcome, launches, _, _ = _orchestrate(tmp_path, crash=2)
    assert outcome == {2: ("crashed", "the worker exited with status 3 during this step")}
    assert launches == [0, 3]


def test_steps_left_when_the_whole_time_box_is_spent_are_not_run(tmp_path):
    outcome, launches, _, _ = _orchestrate(tmp_path, deadline_s=1.0, hang=0)
    assert outcome[0] == ("timed_out", "killed when the whole check's time box ran out")
    assert {i: status for i, (status, _) in outcome.items() if i} == {1: "not_run", 2: "not_run", 3: "not_run"}
    assert launches == [0]


def test_a_cut_off_step_keeps_its_items_and_fails_the_summary(tmp_path):
    steps = gpu_check.STEPS
    write_json(str(tmp_path / steps[0].filename), {"step": steps[0].name, "status": "complete", "items": [
        {"name": "versions", "status": "pass"}], "summary": {"torch": "9.9"}})
    write_json(str(tmp_path / steps[1].filename), {"step": steps[1].name, "status": "running", "items": [
        {"name": "case a", "status": "pass"}, {"name": "case b", "status": "fail", "detail": "too far"}]})
    parent.record_outcome(str(tmp_path), steps, {1: ("timed_out", "killed"), 2: ("not_run", "no time")})
    document = summary.write(str(tmp_path), steps, 1.0)
    entries = {e["name"]: e for e in document["steps"]}
    assert entries["parity"]["status"] == "timed_out" and entries["parity"]["counts"] == {"pass": 1, "fail": 1}
    assert entries["parity"]["problems"] == ["case b: too far"]
    assert entries["bench"]["status"] == "not_run" and entries["gpu_only"]["status"] == "not_run"
    assert document["verdict"] == "fail" and document["environment"] == {"torch": "9.9"}
    assert "| case b | fail | too far |" in (tmp_path / gpu_check.SUMMARY_MARKDOWN).read_text()


def test_parity_step_reads_the_triton_tests_own_cases():
    spec = importlib.util.spec_from_file_location("triton_test_parity", parity_step.TEST_CASES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    definitions = parity_step.test_definitions()
    assert definitions["CASES"] == module.CASES and definitions["BASE"] == module.BASE
    assert definitions["ACTIVATIONS"] == module.ACTIVATIONS
    assert not any(name.startswith("test") for name in definitions)
    names = set(parity_step.cases(dry_run=False))
    assert set(module.CASES) <= names and {f"{a}_bf16" for a in module.ACTIVATIONS} <= names


@pytest.mark.parametrize("dry_run", [True, False])
def test_every_float32_case_runs_in_float32_precision_and_some_in_tf32(dry_run):
    items = parity_step.plan(dry_run)
    float32 = {name for _, name, precision in items if precision}
    assert {name for _, name, precision in items if precision == "highest"} == float32
    assert {name for _, name, precision in items if precision == "high"}


def test_parity_cases_run_in_processes_until_the_time_is_up():
    """The process pool a GPU run spreads the parity cases over (a dry run uses one process)."""
    deadline = time.time() + 20
    results = dict(parity_step.in_processes(abs, [-1, -2, -3], 2, lambda: deadline - time.time()))
    assert results == {0: 1, 1: 2, 2: 3}

    started = time.time()
    deadline = started + 15
    results = dict(parity_step.in_processes(time.sleep, [0.0, 120.0, 120.0], 2, lambda: deadline - time.time()))
    assert results == {0: None, 1: parity_step.NOT_RUN, 2: parity_step.NOT_RUN}
    assert time.time() - started < 45


def test_a_long_log_keeps_its_head_and_tail(tmp_path):
    path = tmp_path / "log.txt"
    path.write_bytes(b"first line\n" + b"x" * 5000 + b"\nlast line\n")
    parent.cap_log(str(path), limit=1000)
    text = path.read_bytes()
    assert text.startswith(b"first line") and text.endswith(b"last line\n") and len(text) < 1100
    assert b"bytes cut" in text


def test_every_profiled_kernel_has_its_model_rows():
    """Step 3 holds each kernel the profiler sees against tools/model_h100.py's rows of the same
    name: every kernel a variant launches must find rows, and every row a kernel."""
    import stadapter_kernels.fused_triton as launcher
    from stadapter_kernels.fused_triton import configs
    from stadapter_kernels.fused_triton.backward import token_outer_product_kernel
    from tools import model_h100
    from tools.gpu_check import gpu_only

    chains = model_h100.chains(8, 8, 197, 768, 384, 3, "bf16")
    for variant in configs.VARIANTS:
        entries = chains[(variant, "forward + backward")]
        names = [launcher._KERNELS[k].__name__ for k in configs.VARIANT_KERNELS[variant]]
        names.append(token_outer_product_kernel.__name__)
        matched = {id(entry): entry for name in names for entry in gpu_only.model_entries(name, entries)}
        assert all(gpu_only.model_entries(name, entries) for name in names), variant
        assert len(matched) == len(entries), (variant, [e[0] for e in entries if id(e) not in matched])


def test_a_shorter_time_limit_shortens_every_step():
    halved = gpu_check.scaled_steps(gpu_check.TOTAL_BUDGET_S / 2)
    assert [s.budget_s * 2 for s in halved] == [s.budget_s for s in gpu_check.STEPS]
    assert sum(s.budget_s for s in gpu_check.STEPS) < gpu_check.TOTAL_BUDGET_S <= 8 * 60


def test_a_terminated_check_stops_its_worker_and_marks_the_rest(tmp_path):
    import signal
    import threading

    previous = signal.signal(signal.SIGTERM, parent.on_terminate)
    threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    try:
        outcome, launches, elapsed, _ = _orchestrate(tmp_path, budget_s=10.0, hang=1)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert outcome == {1: ("timed_out", "the check got SIGTERM"), 2: ("not_run", "the check got SIGTERM"),
                       3: ("not_run", "the check got SIGTERM")}
    assert launches == [0] and elapsed < 9  # before step 1's time box ran out
