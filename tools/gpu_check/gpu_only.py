"""Step 3: what only a GPU can show (../shared/TRITON-REVIEW.md, "What a GPU run must show").

Placeholder order of the checks, each an item: bit-equality across configs and runs, the
B sweep of both variants, the ring's footprint, each backward kernel alone, an int64 case,
CUDA-graph capture.
"""

from __future__ import annotations


def run(context) -> None:
    context.add({"name": "not yet written", "status": "skipped", "detail": "step 3 is being written"})
