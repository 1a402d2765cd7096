"""`STAdapter` against a re-implementation of the official ST-Adapter module's data flow, with
copied weights; state dict compatibility with the official format."""

import itertools
import math

import pytest
import torch
from torch import nn

from backbone_zoo import OfficialAdapter
from parity import rel_error
from stadapter import STAdapter


def to_layout(x_nlc, layout, num_frames):
    if layout == "nlc":
        return x_nlc
    if layout == "lnc":
        return x_nlc.transpose(0, 1).contiguous()
    return x_nlc.unflatten(0, (-1, num_frames))


def from_layout(y, layout):
    if layout == "nlc":
        return y
    if layout == "lnc":
        return y.transpose(0, 1)
    return y.flatten(0, 1)


CASES = list(itertools.product(("nlc", "lnc", "btlc"), (0, 1, 5), (1, 3, 8), (1, 3, 5)))


@pytest.mark.parametrize("layout,prefix,frames,kernel_t", CASES)
def test_matches_official_data_flow(layout, prefix, frames, kernel_t):
    torch.manual_seed(hash((layout, prefix, frames, kernel_t)) % 2**31)
    dim, bottleneck, batch, tokens = 40, 24, 2, prefix + 9
    official = OfficialAdapter(dim, bottleneck, kernel_t, prefix).double()
    for p in official.parameters():  # non-zero everywhere, unlike the identity initialisation
        nn.init.normal_(p, std=1 / math.sqrt(dim))
    ours = STAdapter(dim, bottleneck, kernel_t=kernel_t, prefix_tokens=prefix, layout=layout).double()
    ours.load_state_dict(official.state_dict(), strict=True)

    x = torch.randn(batch * frames, tokens, dim, dtype=torch.float64, requires_grad=True)
    expected = official(x, frames)
    x_ours = to_layout(x.detach(), layout, frames).requires_grad_()
    actual = ours(x_ours, num_frames=frames if layout != "btlc" else None)
    assert rel_error(from_layout(actual, layout), expected) < 1e-12

    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, [x, *official.parameters()], grad)
    actual_grads = torch.autograd.grad(actual, [x_ours, *ours.parameters()], to_layout(grad, layout, frames))
    assert rel_error(from_layout(actual_grads[0], layout), expected_grads[0]) < 1e-12
    for (name, _), a, e in zip(ours.named_parameters(), actual_grads[1:], expected_grads[1:]):
        assert rel_error(a, e) < 1e-12, name


def test_new_adapter_is_the_identity():
    adapter = STAdapter(40, 24)
    x = torch.randn(6, 10, 40)
    assert torch.equal(adapter(x, num_frames=3), x)


def test_state_dict_has_the_official_keys_and_shapes():
    adapter = STAdapter(768, 384, kernel_t=3)
    shapes = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    assert shapes == {
        "fc1.weight": (384, 768), "fc1.bias": (384,), "conv.weight": (384, 1, 3, 1, 1), "conv.bias": (384,),
        "fc2.weight": (768, 384), "fc2.bias": (768,),
    }


def test_state_dict_round_trip():
    source = STAdapter(40, 24, kernel_t=5)
    for p in source.parameters():
        nn.init.normal_(p)
    target = STAdapter(40, 24, kernel_t=5)
    target.load_state_dict(source.state_dict(), strict=True)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.randn(4, 7, 40)
    assert torch.equal(source(x, num_frames=2), target(x, num_frames=2))


def test_loads_an_official_state_dict_strictly():
    official = OfficialAdapter(768, 384, 3, prefix=1)
    adapter = STAdapter(768, 384)
    missing_unexpected = adapter.load_state_dict(official.state_dict(), strict=True)
    assert not missing_unexpected.missing_keys and not missing_unexpected.unexpected_keys
    assert torch.equal(adapter.conv.weight, official.conv.weight)


def test_extra_repr_names_the_configuration():
    text = repr(STAdapter(40, 24, kernel_t=5, activation="gelu", backend="reference"))
    for fragment in ("dim=40", "bottleneck=24", "kernel_t=5", "'gelu'", "'reference'"):
        assert fragment in text


@pytest.mark.parametrize("kwargs,argument", [
    (dict(dim=0, bottleneck=4), "dim"), (dict(dim=8, bottleneck=4, kernel_t=2), "kernel_t"),
    (dict(dim=8, bottleneck=4, activation="tanh"), "activation"), (dict(dim=8, bottleneck=4, layout="nchw"), "layout"),
])
def test_bad_constructor_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        STAdapter(**kwargs)
