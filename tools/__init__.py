"""Developer tools run from the repository root (`python -m tools.gpu_check`, `python tools/measure_cpp.py`).

A regular package, so no installed top-level `tools` elsewhere on the path shadows these."""
