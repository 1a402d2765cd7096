"""Run the Triton kernels on CPU tensors in the Triton interpreter.

TRITON_INTERPRET=1 only takes effect if it is set before triton is first imported, so this
file sets it before anything imports triton, and fails loudly if triton was imported earlier
without it (e.g. `pytest tests` collecting other tests first: run `make test-triton`).
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError(
        "tests/triton needs the Triton interpreter, but triton was imported before TRITON_INTERPRET=1 "
        "was set; run these tests in a process of their own: `make test-triton` or "
        "`TRITON_INTERPRET=1 python -m pytest tests/triton`")
os.environ["TRITON_INTERPRET"] = "1"
