"""Shared pytest setup. Imports nothing that imports triton: tests/triton must be able to
enable the Triton interpreter before triton is first imported in its own process."""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # so test modules anywhere below can `import parity`
