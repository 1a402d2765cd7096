"""Every bad input gets a TypeError/ValueError that names the argument, before any kernel runs,
whatever backend is asked for; the caller's tensors are never modified."""

import pytest
import torch

import stadapter_kernels as sk
from parity import INPUT_NAMES, Case, make_inputs

CASE = Case(batch=2, frames=3, tokens=6, channels=8, bottleneck=4, cond=True)


def good_arguments():
    inputs = make_inputs(CASE, seed=0)
    kwargs = dict(num_frames=3, prefix=1, activation="identity", cond=inputs.pop("cond"), scale=1.0, layout="nlc")
    return inputs, kwargs


def with_input(name, value):
    return lambda inputs, kwargs: inputs.__setitem__(name, value(inputs[name]))


def with_option(name, value):
    return lambda inputs, kwargs: kwargs.__setitem__(name, value)


BAD = {
    "x rank": (with_input("x", lambda x: x[0]), ValueError, "x must be 3-D"),
    "x not a tensor": (with_input("x", lambda x: x.tolist()), TypeError, "x must be a torch.Tensor"),
    "x integer": (with_input("x", lambda x: x.long()), TypeError, "x must have a floating dtype"),
    "C mismatch": (with_input("fc1_weight", lambda w: w[:, :-1]), ValueError, "fc1_weight must have shape"),
    "fc2 shape": (with_input("fc2_weight", lambda w: w.T), ValueError, "fc2_weight must have shape"),
    "fc1 rank": (with_input("fc1_weight", lambda w: w[0]), ValueError, "fc1_weight must be a 2-D"),
    "bias shape": (with_input("fc2_bias", lambda b: b[:-1]), ValueError, "fc2_bias must have shape"),
    "BT not divisible": (with_option("num_frames", 4), ValueError, "not divisible by num_frames"),
    "num_frames missing": (with_option("num_frames", None), ValueError, "num_frames is required"),
    "num_frames float": (with_option("num_frames", 3.0), TypeError, "num_frames must be an int"),
    "prefix too large": (with_option("prefix", 6), ValueError, "prefix must be smaller"),
    "prefix negative": (with_option("prefix", -1), ValueError, "prefix must be >= 0"),
    "even kt": (with_input("conv_weight", lambda w: w[:, :, :2]), ValueError, "kt must be odd"),
    "conv not depthwise": (with_input("conv_weight", lambda w: w.expand(4, 2, 3, 1, 1)), ValueError,
                           "conv_weight must be a depthwise temporal kernel"),
    "conv rank": (with_input("conv_weight", lambda w: w.flatten(1)), ValueError, "conv_weight must be a depthwise"),
    "activation": (with_option("activation", "tanh"), ValueError, "activation must be one of"),
    "layout": (with_option("layout", "nchw"), ValueError, "layout must be one of"),
    "dtype mismatch": (with_input("fc1_weight", lambda w: w.double()), TypeError, "fc1_weight has dtype"),
    "cond shape": (with_option("cond", torch.zeros(3, 4)), ValueError, "cond must have shape"),
    "cond dtype": (with_option("cond", torch.zeros(2, 4, dtype=torch.float16)), TypeError, "cond has dtype"),
    "scale tensor": (with_option("scale", torch.tensor(1.0)), TypeError, "scale must be"),
    "residual not a bool": (with_option("residual", 1), TypeError, "residual must be a bool"),
    "spatial kernel without a square grid": (with_input("conv_weight", lambda w: w.expand(4, 1, 3, 3, 3)), ValueError,
                                             "square grid"),
}
if torch.cuda.is_available():
    BAD["device mismatch"] = (with_input("fc1_weight", lambda w: w.cuda()), ValueError, "fc1_weight is on")


@pytest.mark.parametrize("backend", ["auto", "reference", "cpp", "triton"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gets_a_clear_error(name, backend):
    mutate, error, message = BAD[name]
    inputs, kwargs = good_arguments()
    mutate(inputs, kwargs)
    snapshot = {n: t.clone() for n, t in inputs.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(error, match=message):
        sk.st_adapter(*inputs.values(), backend=backend, **kwargs)
    for n, t in snapshot.items():
        assert torch.equal(inputs[n], t), f"{n} was modified"


def test_layout_rank_is_named():
    inputs, kwargs = good_arguments()
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, T, L, C\) for layout 'btlc'"):
        sk.st_adapter(*inputs.values(), **dict(kwargs, layout="btlc"))


def test_unknown_backend_is_named():
    inputs, kwargs = good_arguments()
    with pytest.raises(ValueError, match="backend must be one of"):
        sk.st_adapter(*inputs.values(), backend="cuda", **kwargs)


def test_btlc_num_frames_must_agree():
    inputs, kwargs = good_arguments()
    inputs["x"] = inputs["x"].unflatten(0, (2, 3))
    with pytest.raises(ValueError, match="num_frames=2 disagrees"):
        sk.st_adapter(*inputs.values(), **dict(kwargs, layout="btlc", num_frames=2))


def test_x_is_never_modified_and_output_is_new():
    inputs, kwargs = good_arguments()
    x_before = inputs["x"].clone()
    out = sk.st_adapter(*inputs.values(), **kwargs)
    assert torch.equal(inputs["x"], x_before)
    assert out.data_ptr() != inputs["x"].data_ptr()


def test_all_input_names_are_covered():
    assert set(good_arguments()[0]) == set(INPUT_NAMES) - {"cond"}
