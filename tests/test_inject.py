"""Injection into every backbone family against a test-local rewrite of its blocks with the official
ST-Adapter data flow; identity of fresh adapters; removal; frames per model; bad input."""

from __future__ import annotations

import threading

import pytest
import torch

import stadapter
from backbone_zoo import FAMILIES, IMAGE, make, official_rewrite, perturb_adapters, timm_vit
from parity import rel_error
from stadapter.backbones import find_backbone
from stadapter.inject import CHILD_NAMES
from stadapter.models import VideoViT

FRAMES, CLIPS = 3, 2
CONFIGS = {
    "pre_attn": dict(positions=("pre_attn",)),
    "pre_mlp": dict(positions=("pre_mlp",)),
    "both": dict(positions=("pre_attn", "pre_mlp")),
    "subset": dict(positions=("pre_attn", "pre_mlp"), layers=[0, 2]),
    "last_n": dict(layers=2),
}


def run_backbone(model, images):
    recipe = find_backbone(model)
    return recipe.run_blocks(recipe.embed(images))


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("family", FAMILIES)
def test_injected_model_matches_the_official_data_flow(family, config):
    model = make(family)
    stadapter.add_st_adapters(model, bottleneck=12, num_frames=FRAMES, **CONFIGS[config])
    perturb_adapters(model)
    reference, official = official_rewrite(model, family, FRAMES)
    # float64 truth, except OpenAI's LayerNorm, which computes in float32 whatever its parameters.
    dtype = torch.float32 if family == "openai" else torch.float64
    reference.to(dtype)
    images = torch.randn(CLIPS * FRAMES, 3, IMAGE, IMAGE)
    out = run_backbone(model, images)
    expected = run_backbone(reference, images.to(dtype))
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.to(dtype))
    assert rel_error(out, expected) <= 1e-5

    blocks = find_backbone(model).blocks
    assert official and {i for i, _ in official} == set(stadapter.summarize(model).config.layers)
    for (index, position), adapter in official.items():
        ours = dict(getattr(blocks[index], CHILD_NAMES[position]).named_parameters())
        for name, p in adapter.named_parameters():
            assert ours[name].grad is not None, name
            assert rel_error(ours[name].grad, p.grad) <= 1e-5, (index, position, name)


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapters_are_the_identity_and_trained_ones_see_frame_order(family):
    model = VideoViT(make(family), num_classes=5, num_frames=4, positions=("pre_attn", "pre_mlp"), bottleneck=8).eval()
    clips = torch.randn(2, 3, 4, IMAGE, IMAGE)
    reversed_clips = clips.flip(2)
    with torch.no_grad():
        assert rel_error(model(clips), model(reversed_clips)) < 1e-6
        perturb_adapters(model, std=0.5)
        assert rel_error(model.pooled(clips), model.pooled(reversed_clips)) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_keys_values_outputs_and_requires_grad(family):
    model = make(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.randn(CLIPS * FRAMES, 3, IMAGE, IMAGE)
    with torch.no_grad():
        expected = run_backbone(model, images)
    summary = stadapter.add_st_adapters(model, positions=("pre_attn", "pre_mlp"), bottleneck=8, num_frames=FRAMES)
    assert summary.trainable_params == summary.adapter_params > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n in model.state_dict() if ".st_adapter_" in n}
    assert set(before) < set(model.state_dict())  # backbone keys unchanged, adapter keys added
    perturb_adapters(model)
    stadapter.remove_st_adapters(model)
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert torch.equal(run_backbone(model, images), expected)


def test_summary_counts_and_prints():
    summary = stadapter.add_st_adapters(make("timm"), layers=[1, 2], bottleneck=8)
    # fc1 (8x40 + 8), conv (8x1x3x1x1 + 8), fc2 (40x8 + 40) per block
    assert summary.per_block == {1: 320 + 8 + 24 + 8 + 320 + 40, 2: 720}
    text = str(summary)
    assert "pre_mlp" in text and "1,440" in text and "trainable" in text


def test_two_models_with_different_frame_counts_do_not_interfere():
    torch.manual_seed(0)
    base = VideoViT(timm_vit(), num_classes=3, num_frames=2, bottleneck=8).eval()
    perturb_adapters(base)
    other = VideoViT(timm_vit(), num_classes=3, num_frames=4, bottleneck=8).eval()
    perturb_adapters(other)
    clips2, clips4 = torch.randn(2, 3, 2, IMAGE, IMAGE), torch.randn(2, 3, 4, IMAGE, IMAGE)
    with torch.no_grad():
        expected2, expected4 = base(clips2), other(clips4)
        results = {}

        def run(name, model, clips):
            for _ in range(5):
                results[name] = model(clips)

        threads = [threading.Thread(target=run, args=("2", base, clips2)),
                   threading.Thread(target=run, args=("4", other, clips4))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(results["2"], expected2) and torch.equal(results["4"], expected4)


def test_unsupported_models_and_bad_arguments_get_named_errors():
    with pytest.raises(TypeError, match="unsupported backbone .*Linear.*supported are"):
        stadapter.add_st_adapters(torch.nn.Linear(3, 3))
    model = make("timm")
    with pytest.raises(ValueError, match="positions must be"):
        stadapter.add_st_adapters(model, positions=("post_mlp",))
    with pytest.raises(ValueError, match="layers=7"):
        stadapter.add_st_adapters(model, layers=7)
    with pytest.raises(ValueError, match=r"layers \[5\] out of range"):
        stadapter.add_st_adapters(model, layers=[0, 5])
    with pytest.raises(TypeError, match="unknown adapter options \\['bottle'\\]"):
        stadapter.add_st_adapters(model, bottle=3)
    assert all(p.requires_grad for p in model.parameters()), "a failed injection must leave the model as it was"
    stadapter.add_st_adapters(model, bottleneck=8)
    with pytest.raises(ValueError, match="already has ST-Adapters"):
        stadapter.add_st_adapters(model)
    with pytest.raises(RuntimeError, match="number of frames is not set"):
        run_backbone(model, torch.randn(2, 3, IMAGE, IMAGE))


@pytest.mark.parametrize("clips, message", [
    (torch.randn(2, 3, 4, IMAGE), "5-D"),
    (torch.randn(2, 1, 4, IMAGE, IMAGE), "3 colour channels"),
    (torch.randn(2, 3, 5, IMAGE, IMAGE), "T=5 frames"),
    (torch.randn(2, 3, 4, IMAGE + 4, IMAGE), "backbone takes 16x16"),
])
def test_video_model_rejects_bad_clips(clips, message):
    model = VideoViT(make("openai"), num_classes=3, num_frames=4, bottleneck=8)
    with pytest.raises(ValueError, match=message):
        model(clips)


def test_vit_base_parameter_counts():
    import timm

    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0)
    total = sum(p.numel() for p in vit.parameters())
    summary = stadapter.add_st_adapters(vit, bottleneck=384)
    assert summary.adapter_params == 12 * 592_512 == summary.trainable_params
    assert summary.total_params == total + summary.adapter_params
    video = VideoViT(vit, num_classes=400, num_frames=8)
    assert sum(p.numel() for p in video.parameters() if p.requires_grad) == 12 * 592_512 + 768 * 400 + 400
