"""The demo's parts (moving digits, frame ViT) and a tiny end-to-end `stadapter demo` run."""

from __future__ import annotations

import json

import numpy as np
import pytest


from stadapter.data import ClipConfig, VideoDataset
from stadapter.demo import MOTIONS, MotionClass, digit_images, pretrain_frame_vit, write_moving_digits
from stadapter.demo.digits import positions, random_frames, render_video
from stadapter.demo.frame_vit import FrameViTConfig
from stadapter.demo.run import main


def test_motion_classes_and_names():
    assert MotionClass("left", digit=3).name == "a 3 moving left"
    assert MotionClass("clockwise").name == "a digit moving clockwise"
    with pytest.raises(ValueError, match="motion must be one of"):
        MotionClass("sideways")
    with pytest.raises(ValueError, match="digit"):
        MotionClass("left", digit=12)


@pytest.mark.parametrize("forward, backward", [("right", "left"), ("down", "up"), ("clockwise", "counterclockwise")])
def test_time_reversed_pairs_share_their_frames(forward, backward):
    # Same random path parameters: the backward motion is the forward one played in reverse,
    # so the bag of frames (and any average over it) is the same.
    a = positions(forward, 9, np.random.default_rng(4))
    b = positions(backward, 9, np.random.default_rng(4))
    assert np.allclose(a, b[::-1]) and not np.allclose(a, b)
    assert ((0 <= a) & (a <= 1)).all()


def test_there_and_back_pair_is_mirrored():
    # A there-and-back path is the same played backwards, so its pair is the mirror image:
    # it starts at the other end, and the frames still spread evenly over the same sweep.
    a = positions("right and back", 9, np.random.default_rng(4))
    b = positions("left and back", 9, np.random.default_rng(4))
    assert np.allclose(a[:, 1], b[:, 1]) and np.allclose(a[:, 0] + b[:, 0], a[0, 0] + b[0, 0])
    assert a[0, 0] < 0.15 < 0.85 < b[0, 0] and a[4, 0] > 0.85 and b[4, 0] < 0.15


def test_digit_splits_are_disjoint_and_videos_show_the_digit():
    train_images, _ = digit_images("train")
    test_images, _ = digit_images("test")
    assert len(train_images) + len(test_images) == 1797
    assert not (train_images[:, None] == test_images[None, :100]).all(axis=(2, 3)).any()
    video = render_video(MotionClass("up", digit=7), 6, 32, 16, np.random.default_rng(0), "test")
    assert video.shape == (6, 32, 32, 3) and video.dtype == np.uint8 and video.max() > 200
    frames, digits = random_frames(5, 32, 16, np.random.default_rng(0))
    assert frames.shape == (5, 32, 32, 3) and digits.shape == (5,) and set(digits) <= set(range(10))
    with pytest.raises(ValueError, match="digit_size"):
        random_frames(1, 32, 12, np.random.default_rng(0))


def test_written_videos_load_as_a_folder_dataset(tmp_path):
    classes = [MotionClass("left", 3), MotionClass("right", 3), "clockwise"]
    samples = write_moving_digits(str(tmp_path), classes, 2, num_frames=6, size=32, seed=3)
    assert [label for _, label in samples] == [0, 0, 1, 1, 2, 2]
    assert json.loads((tmp_path / "classes.json").read_text()) == ["a 3 moving left", "a 3 moving right",
                                                                   "a digit moving clockwise"]
    data = VideoDataset.from_folder(str(tmp_path), clip=ClipConfig(num_frames=6, crop_size=32, train_scale=(32, 32)),
                                    train=False)
    assert data.labels == [0, 0, 1, 1, 2, 2] and data.class_names[0] == "00_a_3_moving_left"
    assert data[0]["clip"].shape == (1, 3, 6, 32, 32)
    with pytest.raises(ValueError, match="split"):
        write_moving_digits(str(tmp_path / "x"), ["left"], 1, split="val")
    assert set(MOTIONS) >= {"left", "right", "up", "down", "clockwise", "counterclockwise"}


def test_frame_vit_pretraining_returns_a_headless_timm_vit():
    # (Whether it learns is the demo's business: a few steps of a tiny model stay at chance.)
    config = FrameViTConfig(embed_dim=32, depth=1, num_heads=2)
    losses = []
    model, info = pretrain_frame_vit(config, steps=3, batch_size=8, eval_frames=20, log=lambda s, l: losses.append(l))
    assert model.num_classes == 0 and not model.training and model.embed_dim == 32 and len(model.blocks) == 1
    assert info["steps"] == 3 and 0 <= info["test_accuracy"] <= 1 and len(losses) == 2
    assert info["config"] == config.timm_kwargs()


def test_tiny_demo_trains_and_writes_json_and_plot(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--tiny", "--output", str(out), "--json", str(tmp_path / "r.json")]) == 0
    results = json.loads((tmp_path / "r.json").read_text())
    assert results == json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"linear probe", "ST-Adapters"} and results["chance"] == 50.0
    assert all(0 <= a <= 100 for a in results["accuracy"].values())
    params = results["sizes"]["trainable_parameters"]
    assert params["ST-Adapters"] > params["linear probe"] > 0
    for name, curve in results["curves"].items():
        assert len(curve["loss"]) == 2 and all(np.isfinite(curve["loss"])) and len(curve["eval_top1"]) == 1, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "linear probe" in capsys.readouterr().out
