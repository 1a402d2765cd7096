"""The benchmark's model mode: every provider's model is a VideoViT built by add_st_adapters, and
the official, reference and fused providers compute the same function (one frozen block here)."""

import torch

from benchmarks import config
from benchmarks.model import build_model
from parity import rel_error
from stadapter.inject import CHILD_NAMES, adapted_blocks
from stadapter.models import VideoViT


def test_model_mode_providers_agree_and_use_the_public_injection():
    cfg = config.ModelConfig(depth=1, clips=1, frames=2, bottleneck=64)
    clips = torch.randn(1, 3, 2, 224, 224)
    outputs = {}
    for provider in ("official", "reference", "fused"):
        model = build_model(provider, cfg, torch.float32, "cpu", notes=[]).eval()
        assert isinstance(model, VideoViT)
        [(_, block)] = adapted_blocks(model)
        assert type(getattr(block, CHILD_NAMES["pre_mlp"])).__name__ == \
            {"official": "OfficialAdapter"}.get(provider, "STAdapter")
        with torch.no_grad():
            outputs[provider] = model.pooled(clips)
    assert rel_error(outputs["fused"], outputs["official"]) < 1e-5
    assert rel_error(outputs["reference"], outputs["official"]) < 1e-5
    floor = build_model("floor", cfg, torch.float32, "cpu", notes=[])
    assert [n for n, p in floor.named_parameters() if p.requires_grad] == \
        ["backbone.blocks.0.st_adapter_pre_mlp.shift", "head.weight", "head.bias"]
