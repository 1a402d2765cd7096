"""stadapter_kernels: the fused spatio-temporal adapter operator.

Public names: `st_adapter` (the op), `explain` (which backend runs and why), `ACTIVATIONS`,
`LAYOUTS`, `BACKEND_PREFERENCE`, `BackendUnavailableError`, `Explanation`, and the `reference`
module (eager implementation and float64 oracle). This package never imports `stadapter`.
"""

from . import reference
from .activations import ACTIVATIONS
from .dispatch import BACKEND_PREFERENCE, BackendUnavailableError, Explanation
from .op import explain, st_adapter
from .spec import LAYOUTS

__all__ = [
    "ACTIVATIONS",
    "BACKEND_PREFERENCE",
    "BackendUnavailableError",
    "Explanation",
    "LAYOUTS",
    "explain",
    "reference",
    "st_adapter",
]
__version__ = "0.1.0"
