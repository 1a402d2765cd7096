"""Microbenchmark suite of the fused spatio-temporal adapter.

`python -m benchmarks` (or `stadapter bench`, or `make bench`) runs `benchmarks.runner`; the
pytest-benchmark wrappers in `benchmarks/test_*.py` run under `pytest benchmarks --benchmark-only`.
README.md in this folder documents the providers, modes, metrics and the JSON/CSV schema.
"""
