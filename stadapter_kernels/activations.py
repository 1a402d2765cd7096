"""The bottleneck activations: each a forward function and its derivative, in eager PyTorch.

The names are the op's `activation` argument. The fused kernels implement the same formulas
in their own languages; this table is what the reference and the tests hold them to.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_CUBIC = 0.044715
#: The constant of CLIP's QuickGELU, x * sigmoid(1.702 x).
QUICK_GELU_ALPHA = 1.702


class Activation(NamedTuple):
    forward: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]  # d act(z) / dz, elementwise


def _gelu_derivative(z):
    cdf = 0.5 * (1.0 + torch.erf(z * _INV_SQRT_2))
    return cdf + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI


def _gelu_tanh_derivative(z):
    inner = _SQRT_2_OVER_PI * (z + _GELU_TANH_CUBIC * z * z * z)
    t = torch.tanh(inner)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * z * z)


def _quick_gelu_derivative(z):
    s = torch.sigmoid(QUICK_GELU_ALPHA * z)
    return s + QUICK_GELU_ALPHA * z * s * (1.0 - s)


def _silu_derivative(z):
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


ACTIVATIONS: dict[str, Activation] = {
    "identity": Activation(lambda z: z, torch.ones_like),
    "relu": Activation(F.relu, lambda z: (z > 0).to(z.dtype)),
    "gelu": Activation(F.gelu, _gelu_derivative),
    "gelu_tanh": Activation(lambda z: F.gelu(z, approximate="tanh"), _gelu_tanh_derivative),
    "quick_gelu": Activation(lambda z: z * torch.sigmoid(QUICK_GELU_ALPHA * z), _quick_gelu_derivative),
    "silu": Activation(F.silu, _silu_derivative),
}
