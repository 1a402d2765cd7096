"""Run the Triton kernels on CPU tensors in the Triton interpreter.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported, so this
file sets it before anything imports triton, and fails loudly if triton was imported earlier
without it (e.g. `pytest tests` collecting other tests first: run `make test-triton`).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/triton needs the Triton interpreter, but triton was imported before TRITON_INTERPRET=1 "
        "was set; run these tests in a process of their own: `make test-triton` or "
        "`TRITON_INTERPRET=1 python -m pytest tests/triton`")
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

_interpreter_cast = interpreter.InterpreterBuilder.cast_impl


def _cast_rounding_to_nearest(self, src, dst_type):
    """fp32 -> bf16 rounded to nearest even, as a GPU's cvt.rn.bf16.f32 (and torch) does: the
    interpreter (triton 3.8) truncates, which doubled every bf16 error its tests measured."""
    if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.int16).numpy()
        return interpreter.TensorHandle(rounded.view(np.uint16), dst_type.scalar)
    return _interpreter_cast(self, src, dst_type)


interpreter.InterpreterBuilder.cast_impl = _cast_rounding_to_nearest

REPO = Path(__file__).resolve().parents[2]


#: What the resource test compiles: both architectures, every variant and shipped config,
#: batch 1 and 8 (they specialise differently), ViT-B's shape (Ca = 384: every kernel loops over
#: BLOCK_A chunks of Ca, so register use does not grow with it, and every CA_PAD bucket ships
#: the same configs), a 16-bit dtype and float32 with accurate dots, and the activation with
#: the most registers plus relu (whose backward keeps float32 y).
AOT_ARGUMENTS = ("--arch", "sm_80,sm_90", "--channels", "768", "--bottlenecks", "384", "--batches", "1,8",
                 "--dtypes", "bf16,fp32/highest", "--activation", "gelu,relu")


class AheadOfTimeReport:
    """`python -m stadapter_kernels.inspect` (AOT_ARGUMENTS) started when the session starts.

    Compiling every shipped config takes minutes of one core, while the interpreter tests keep
    the other busy: running it alongside them keeps the suite's wall time down. It runs
    without TRITON_INTERPRET, which would replace the kernels by Python functions.
    """

    def __init__(self):
        self.directory = tempfile.TemporaryDirectory(prefix="stadapter-inspect-")
        self.json_path = Path(self.directory.name) / "usage.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "stadapter_kernels.inspect", *AOT_ARGUMENTS, "--json", str(self.json_path)],
            env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self, timeout: float):
        """(exit status, printed table, rows as dicts)."""
        output, _ = self.process.communicate(timeout=timeout)
        rows = json.loads(self.json_path.read_text()) if self.json_path.exists() else []
        return self.process.returncode, output, rows

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.directory.cleanup()


_REPORT = None


def pytest_collection_finish(session):
    global _REPORT
    if any(item.get_closest_marker("aot_compile") for item in session.items):
        _REPORT = AheadOfTimeReport()


def pytest_sessionfinish(session, exitstatus):
    if _REPORT is not None:
        _REPORT.close()


def pytest_configure(config):
    config.addinivalue_line("markers", "aot_compile: needs the ahead-of-time compile report (sm_80, sm_90)")


@pytest.fixture
def aot_report():
    if _REPORT is None:
        pytest.skip("the ahead-of-time report was not started")
    return _REPORT
