"""The eager reference backend against the float64 oracle: every layout, prefix, T, kt,
activation, optional input and dtype, output and every gradient."""

import itertools

import pytest
import torch

import stadapter_kernels as sk
from parity import Case, assert_matches_oracle

BASE = Case()

GRID = (
    [BASE.with_(layout=layout, prefix=prefix, tokens=prefix + 7)
     for layout, prefix in itertools.product(sk.LAYOUTS, (0, 1, 5))]
    + [BASE.with_(frames=frames, kernel_t=kt) for frames, kt in itertools.product((1, 3, 8), (1, 3, 5))]
    + [BASE.with_(activation=activation) for activation in sk.ACTIVATIONS]
    + [BASE.with_(cond=True), BASE.with_(biases=False, cond=True, scale=2.0), BASE.with_(bottleneck=384)]
    + [BASE.with_(kernel_hw=3, tokens=10), BASE.with_(kernel_hw=3, tokens=17, prefix=1, layout="lnc")]
    + [BASE.with_(dtype=dtype, layout=layout) for dtype in (torch.bfloat16, torch.float16) for layout in sk.LAYOUTS]
    + [BASE.with_(dtype=torch.float64, activation="quick_gelu", cond=True)]
    + [BASE.with_(residual=False, kernel_t=1, prefix=0, tokens=6), BASE.with_(residual=False, cond=True),
       BASE.with_(residual=False, layout="lnc", dtype=torch.bfloat16)]
)


@pytest.mark.parametrize("case", GRID, ids=str)
def test_reference_matches_oracle(case):
    assert_matches_oracle(case, backend="reference")


def test_poisoning_catches_an_unwritten_element(monkeypatch):
    """The harness must fail a backend that leaves one output element unwritten."""
    from stadapter_kernels import reference

    original = reference.forward

    def forgetful_forward(out, x, params, options):
        original(out, x, params, options)
        out[0, 0, -1, 0] = torch.empty((), dtype=out.dtype)  # NaN under the harness's poisoning

    monkeypatch.setattr(reference, "forward", forgetful_forward)
    with pytest.raises(AssertionError, match="out"):
        assert_matches_oracle(BASE, backend="reference")


def test_oracle_is_sensitive_to_every_input():
    """A wrong conv tap, bias or cond in a backend would be seen: each one changes the oracle."""
    from parity import INPUT_NAMES, call, make_inputs
    from stadapter_kernels.reference import oracle

    case = BASE.with_(cond=True, dtype=torch.float64)
    inputs = make_inputs(case, seed=0)
    base = call(oracle, inputs, case)
    for name in INPUT_NAMES:
        changed = dict(inputs, **{name: inputs[name] + 0.1})
        assert not torch.allclose(call(oracle, changed, case), base), name
