"""stadapter.train: schedule, parameter groups, checkpoints and exact resume, on mp4 files.

The runs use a tiny random timm ViT (32 x 32 frames, 2 blocks) and moving-digits videos
written here; each takes a few seconds on a CPU. `tiny_videos` and `tiny_config` are shared
with the CLI and DDP tests.
"""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch


from safetensors.torch import load_file

from stadapter.demo.digits import write_moving_digits
from stadapter.models import VideoViT
from stadapter.train import (CheckpointError, CheckpointSkippedWarning, TrainConfig, WarmupCosine,
                             latest_valid_checkpoint, list_checkpoints, param_groups, scaled_lr, train,
                             verify_checkpoint)
from stadapter.train import checkpoints as checkpoints_module
from stadapter.train.trainer import build_backbone

TINY_VIT = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}


def write_tiny_videos(root) -> tuple[str, str]:
    """8 training and 4 test videos of 2 classes, 8 frames of 32 x 32."""
    train_dir, test_dir = str(root / "train"), str(root / "test")
    write_moving_digits(train_dir, ["right", "left"], 4, num_frames=8, size=32, digit_size=16)
    write_moving_digits(test_dir, ["right", "left"], 2, num_frames=8, size=32, digit_size=16, split="test", seed=1)
    return train_dir, test_dir


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory):
    return write_tiny_videos(tmp_path_factory.mktemp("digits"))


def tiny_config(train_dir, test_dir, output_dir, **overrides) -> TrainConfig:
    settings = dict(train_data=train_dir, val_data=test_dir, backbone="vit_tiny_patch16_224", backbone_kwargs=TINY_VIT,
                    num_frames=4, crop_size=32, train_scale=(32, 40), bottleneck=8, epochs=1, batch_size=2,
                    num_workers=0, lr=1e-2, warmup_epochs=0.25, dropout=0.5, output_dir=str(output_dir),
                    progress=False, log_every=1, threads=1)
    return TrainConfig(**{**settings, **overrides})


def test_schedule_values_at_known_steps():
    schedule = WarmupCosine(warmup_steps=2, total_steps=10, min_ratio=0.1)
    assert [schedule(s) for s in (0, 1)] == pytest.approx([1 / 3, 2 / 3])
    assert schedule(2) == pytest.approx(1.0)
    assert schedule(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert schedule(10) == pytest.approx(0.1) and schedule(25) == pytest.approx(0.1)
    assert scaled_lr(1e-3, 64) == pytest.approx(2.5e-4) and scaled_lr(4e-3, 512) == pytest.approx(8e-3)
    with pytest.raises(ValueError, match="global_batch"):
        scaled_lr(1e-3, 0)


def test_param_groups_no_decay_on_biases_and_norms(tmp_path):
    config = tiny_config(None, None, tmp_path, positions=("pre_attn", "pre_mlp"))
    model = VideoViT(build_backbone(config), 3, 4, positions=config.positions, bottleneck=8)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert "head.weight" in decayed and "head.bias" in undecayed
    assert all(n.endswith(("fc1.weight", "fc2.weight", "conv.weight")) for n in decayed - {"head.weight"})
    assert all(n.endswith(".bias") for n in undecayed)
    assert len(decayed) == 1 + 2 * 2 * 3  # head + (fc1, conv, fc2) in 2 positions of 2 blocks
    # A trainable norm (not the case in a frozen backbone, but possible) gets no decay either.
    model.backbone.norm.requires_grad_(True)
    assert {names[id(p)] for p in param_groups(model, 0.05)[1]["params"]} >= {"backbone.norm.weight"}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert not frozen & (decayed | undecayed) and "backbone.blocks.0.attn.qkv.weight" in frozen


def adapter_tensors(output_dir) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / "adapters.safetensors"))


def test_resume_continues_the_same_run_bit_for_bit(tiny_videos, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    summary = train(tiny_config(*tiny_videos, straight, max_steps=4))
    assert summary["step"] == 4 and summary["steps_per_epoch"] == 4 and summary["lr"] == 1e-2
    first = train(tiny_config(*tiny_videos, split, max_steps=2))
    assert first["step"] == 2 and [p.name for p in list_checkpoints(split)] == ["step-00000002"]
    resumed = train(tiny_config(*tiny_videos, split, max_steps=4))
    assert resumed["resumed_from"].endswith("step-00000002") and resumed["step"] == 4
    a, b = adapter_tensors(straight), adapter_tensors(split)
    assert a.keys() == b.keys() and "head.weight" in a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # The resumed run did train its two steps: step 4's tensors are not step 2's.
    at_two = load_file(str(list_checkpoints(split)[0] / "adapters.safetensors"))
    assert [p.name for p in list_checkpoints(split)] == ["step-00000002", "step-00000004"]
    assert not torch.equal(at_two["head.weight"], b["head.weight"])


def test_lr_is_scaled_by_the_global_batch(tiny_videos, tmp_path):
    summary = train(tiny_config(*tiny_videos, tmp_path, lr=None, blr=2.56e-2, accum_steps=2, max_steps=1))
    assert summary["global_batch"] == 4 and summary["lr"] == pytest.approx(2.56e-2 * 4 / 256)
    assert summary["steps_per_epoch"] == 2 and summary["final_eval"]["videos"] == 4

@pytest.fixture
def run_with_two_checkpoints(tiny_videos, tmp_path):
    """An output folder with checkpoints at steps 2 and 4."""
    config = tiny_config(*tiny_videos, tmp_path / "run", max_steps=2)
    train(config)
    train(tiny_config(*tiny_videos, tmp_path / "run", max_steps=4))
    return config, tmp_path / "run"


def test_failed_checkpoint_write_leaves_the_previous_one(run_with_two_checkpoints, tiny_videos, monkeypatch):
    config, output = run_with_two_checkpoints
    before = {p.name: verify_checkpoint(p) for p in list_checkpoints(output)}

    def save_half_then_fail(obj, path, *args, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"half a state")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints_module.torch, "save", save_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        train(tiny_config(*tiny_videos, output, max_steps=5, epochs=2))
    monkeypatch.undo()
    # Nothing half-written is left, and both earlier checkpoints still verify.
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == sorted(before)
    assert {p.name: verify_checkpoint(p) for p in list_checkpoints(output)} == before
    assert latest_valid_checkpoint(output).name == "step-00000004"


def test_truncated_checkpoint_skipped_by_auto_resume_refused_by_resume(run_with_two_checkpoints, tiny_videos):
    config, output = run_with_two_checkpoints
    newest = list_checkpoints(output)[-1]
    data = (newest / "adapters.safetensors").read_bytes()
    (newest / "adapters.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.warns(CheckpointSkippedWarning, match=r"step-00000004.*adapters.safetensors.*truncated"):
        assert latest_valid_checkpoint(output).name == "step-00000002"
    with pytest.raises(CheckpointError, match=r"step-00000004: adapters.safetensors is \d+ bytes"):
        train(tiny_config(*tiny_videos, output, max_steps=3, resume=str(newest)))
    with pytest.warns(CheckpointSkippedWarning):
        summary = train(tiny_config(*tiny_videos, output, max_steps=3))
    assert summary["resumed_from"].endswith("step-00000002") and summary["step"] == 3
    # A checkpoint folder without its manifest (a copy interrupted before the end) is refused too.
    (list_checkpoints(output)[0] / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json"):
        verify_checkpoint(list_checkpoints(output)[0])


def test_skipped_videos_are_counted_in_the_metrics(tiny_videos, tmp_path):
    train_dir = tmp_path / "train"
    shutil.copytree(tiny_videos[0], train_dir)
    broken = sorted(train_dir.glob("00_*/*.mp4"))[0]
    broken.write_bytes(b"\0" * 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train(tiny_config(str(train_dir), tiny_videos[1], tmp_path / "run", max_steps=4, amp="bfloat16"))
    assert summary["skipped_videos"] == 1 and summary["skipped_paths"] == [str(broken)]
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"skipped_videos": 1' in lines[-2]  # the last train record (the eval record follows)
