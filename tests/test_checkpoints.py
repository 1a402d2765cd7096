"""Adapter files (safetensors, atomic, strict) and the official ST-Adapter release's format."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import stadapter
from backbone_zoo import IMAGE, OfficialAdapter, make, openai_clip_module, perturb_adapters
from parity import rel_error
from stadapter import AdapterFileError
from stadapter.models import VideoViT

FRAMES = 3


def video_model(seed=0, num_classes=4, **adapter_args):
    args = dict(positions=("pre_attn", "pre_mlp"), bottleneck=8) | adapter_args
    model = VideoViT(make("timm", seed=0), num_classes=num_classes, num_frames=FRAMES, **args).eval()
    torch.manual_seed(seed)
    perturb_adapters(model, seed=seed)
    nn.init.normal_(model.head.weight)
    return model


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)


def test_save_then_load_into_a_fresh_model_gives_the_same_outputs(tmp_path):
    trained, fresh = video_model(seed=1), video_model(seed=2)
    clips = torch.randn(2, 3, FRAMES, IMAGE, IMAGE)
    path = tmp_path / "task.safetensors"
    stadapter.save_adapters(trained, path)
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file must be renamed away"
    with torch.no_grad():
        assert not torch.equal(fresh(clips), trained(clips))
        config = stadapter.load_adapters(fresh, path)
        assert torch.equal(fresh(clips), trained(clips))
    assert config.positions == ("pre_attn", "pre_mlp") and config.bottleneck == 8


def test_loading_into_a_model_without_adapters_injects_them_from_the_config(tmp_path):
    source = make("open_clip")
    stadapter.add_st_adapters(source, layers=[1, 2], bottleneck=6, kernel_t=5, num_frames=FRAMES)
    perturb_adapters(source)
    path = tmp_path / "backbone.safetensors"
    stadapter.save_adapters(source, path)
    target = make("open_clip")
    stadapter.load_adapters(target, path)
    stadapter.set_num_frames(target, FRAMES)
    images = torch.randn(2 * FRAMES, 3, IMAGE, IMAGE)
    with torch.no_grad():
        assert torch.equal(target(images), source(images))
    assert stadapter.summarize(target).config == stadapter.summarize(source).config


def test_file_holds_only_trainable_tensors_and_the_config(tmp_path):
    from safetensors import safe_open

    model = video_model()
    path = tmp_path / "a.safetensors"
    stadapter.save_adapters(model, path)
    with safe_open(str(path), "pt") as f:
        keys, metadata = set(f.keys()), f.metadata()
    assert keys == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".st_adapter_" in k or k.startswith("head.") for k in keys)
    assert json.loads(metadata["adapter_config"])["layers"] == [0, 1, 2]
    payload = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert payload < path.stat().st_size < payload + 16_384  # tensors plus a small JSON header


def _rewrite(path, tensors, metadata):
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)


def _bad_files(tmp_path, model):
    from safetensors.torch import load_file, save_file

    good = tmp_path / "good.safetensors"
    stadapter.save_adapters(model, good)
    data = good.read_bytes()
    from safetensors import safe_open
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(good))
    cases = {}
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "truncated.safetensors", "not a readable safetensors file")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 not safetensors at all" * 10)
    cases["garbage"] = (tmp_path / "garbage.safetensors", "not a readable safetensors file")
    save_file(tensors, str(tmp_path / "foreign.safetensors"))
    cases["foreign"] = (tmp_path / "foreign.safetensors", "metadata key 'format'")
    dropped = sorted(tensors)[3]
    _rewrite(tmp_path / "missing.safetensors", {k: v for k, v in tensors.items() if k != dropped}, metadata)
    cases["missing key"] = (tmp_path / "missing.safetensors", f"missing key '{dropped}'")
    _rewrite(tmp_path / "extra.safetensors", tensors | {"backbone.blocks.0.extra": torch.zeros(2)}, metadata)
    cases["extra key"] = (tmp_path / "extra.safetensors", "unexpected key 'backbone.blocks.0.extra'")
    _rewrite(tmp_path / "shape.safetensors", tensors | {"head.weight": torch.zeros(7, 40)}, metadata)
    cases["shape"] = (tmp_path / "shape.safetensors", r"key 'head.weight' has shape \(7, 40\) in the file but \(4, 40\)")
    other = json.loads(metadata["adapter_config"]) | {"kernel_t": 5}
    _rewrite(tmp_path / "config.safetensors", tensors, metadata | {"adapter_config": json.dumps(other)})
    cases["config"] = (tmp_path / "config.safetensors", "adapter_config.kernel_t is 5 in the file but 3")
    cases["no file"] = (tmp_path / "absent.safetensors", "cannot read")
    return cases


def test_bad_files_raise_a_named_error_and_leave_the_model_unchanged(tmp_path):
    model = video_model()
    before = snapshot(model)
    for name, (path, message) in _bad_files(tmp_path, video_model(seed=3)).items():
        with pytest.raises(AdapterFileError, match=message) as error:
            stadapter.load_adapters(model, path)
        assert str(path) in str(error.value), name
        assert_unchanged(model, before)


def test_a_bad_file_leaves_a_model_without_adapters_without_adapters(tmp_path):
    source = make("timm")
    stadapter.add_st_adapters(source, bottleneck=8)
    path = tmp_path / "a.safetensors"
    stadapter.save_adapters(source, path)
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["blocks.0.st_adapter_pre_mlp.fc1.weight"] = torch.zeros(3, 3)
    _rewrite(path, tensors, metadata)
    target = make("timm")
    before = snapshot(target)
    with pytest.raises(AdapterFileError, match="has shape"):
        stadapter.load_adapters(target, path)
    assert_unchanged(target, before)
    assert stadapter.inject.adapter_config(target) is None


def test_vit_base_adapter_file_size(tmp_path):
    import timm

    vit = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=0)
    full_bytes = sum(t.numel() * t.element_size() for t in vit.state_dict().values())
    model = VideoViT(vit, num_classes=400, num_frames=8)
    path = tmp_path / "vit_b16.safetensors"
    stadapter.save_adapters(model, path)
    adapters_and_head = (12 * 592_512 + 768 * 400 + 400) * 4
    assert adapters_and_head < path.stat().st_size < adapters_and_head + 65_536
    assert path.stat().st_size < 0.35 * full_bytes


# ---- the official release ------------------------------------------------------------------------

WIDTH = 128  # OpenAI CLIP has width // 64 heads, so the test tower is 2 heads of 64


class OfficialModel(nn.Module):
    """Test-local model with the official release's module names and data flow: OpenAI CLIP's
    vision tower with `adapter_pre_attn` / `adapter_pre_mlp` in its blocks, `ln_post(mean_t(cls))`,
    dropout and `fc`."""

    def __init__(self, num_classes=6, layers=(1, 2), positions=("pre_attn", "pre_mlp"), bottleneck=16, kernel_t=3):
        super().__init__()
        torch.manual_seed(0)
        self.visual = openai_clip_module().VisionTransformer(input_resolution=IMAGE, patch_size=4, width=WIDTH,
                                                             layers=3, heads=WIDTH // 64, output_dim=32)
        self.positions = positions
        for i, block in enumerate(self.visual.transformer.resblocks):
            for position in positions:
                if i in layers:
                    setattr(block, f"adapter_{position}", OfficialAdapter(WIDTH, bottleneck, kernel_t, prefix=1))
        self.visual.dropout = nn.Dropout(0.5)
        self.visual.fc = nn.Linear(WIDTH, num_classes)
        perturb_adapters_official(self)

    def forward(self, clips):
        v = self.visual
        batch, _, frames = clips.shape[:3]
        x = v.conv1(clips.transpose(1, 2).flatten(0, 1)).flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        for block in v.transformer.resblocks:  # the official adapters run batch-first
            if hasattr(block, "adapter_pre_attn"):
                x = block.adapter_pre_attn(x, frames)
            x = x + block.attention(block.ln_1(x.transpose(0, 1))).transpose(0, 1)
            if hasattr(block, "adapter_pre_mlp"):
                x = block.adapter_pre_mlp(x, frames)
            x = x + block.mlp(block.ln_2(x))
        cls = x[:, 0].unflatten(0, (batch, frames)).mean(1)
        return v.fc(v.dropout(v.ln_post(cls)))

    def trainable(self):
        return {k: v.clone() for k, v in self.visual.state_dict().items() if "adapter_" in k or k.startswith("fc.")}

    def clip_state_dict(self):
        visual = {f"visual.{k}": v.clone() for k, v in self.visual.state_dict().items()
                  if "adapter_" not in k and not k.startswith("fc.")}
        return visual | {"token_embedding.weight": torch.zeros(10, 32)}  # text tower keys are ignored


def perturb_adapters_official(model):
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adapter_" in name or ".fc." in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


@pytest.mark.parametrize("wrapped", [True, False], ids=["model-entry", "bare"])
def test_from_official_reproduces_the_official_model(tmp_path, wrapped):
    official = OfficialModel().eval()
    checkpoint, clip_weights = tmp_path / "checkpoint.pth", tmp_path / "ViT-tiny.pt"
    torch.save({"model": official.trainable(), "epoch": 3} if wrapped else official.trainable(), checkpoint)
    torch.save(official.clip_state_dict(), clip_weights)
    model = VideoViT.from_official(checkpoint, clip_weights, num_frames=FRAMES).eval()
    config = stadapter.summarize(model).config
    assert (config.positions, config.layers, config.bottleneck, config.kernel_t) == \
        (("pre_attn", "pre_mlp"), (1, 2), 16, 3)
    clips = torch.randn(2, 3, FRAMES, IMAGE, IMAGE)
    with torch.no_grad():
        assert rel_error(model(clips), official(clips)) <= 1e-5
    written = model.official_state_dict()
    expected = official.trainable()
    assert set(written) == set(expected) and all(torch.equal(written[k], expected[k]) for k in expected)


def test_official_checkpoint_errors_name_the_key(tmp_path):
    official = OfficialModel(layers=(2,), positions=("pre_mlp",))
    clip_weights = tmp_path / "clip.pt"
    torch.save(official.clip_state_dict(), clip_weights)
    state = official.trainable()
    broken = {k: v for k, v in state.items() if k != "fc.bias"}
    with pytest.raises(AdapterFileError, match="fc.bias"):
        VideoViT.from_official(broken, clip_weights)
    with pytest.raises(AdapterFileError, match="'transformer.resblocks.0.attn.in_proj_weight' is neither"):
        VideoViT.from_official(state | {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3)}, clip_weights)
    pickled = tmp_path / "evil.pth"
    torch.save({"model": state, "hook": OfficialAdapter(4, 2, 3, 1)}, pickled)  # not loadable weights-only
    with pytest.raises(AdapterFileError, match="evil.pth"):
        VideoViT.from_official(pickled, clip_weights)
