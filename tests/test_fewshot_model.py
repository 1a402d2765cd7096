"""MA-CLIP against a test-local eager rewrite of the adapted block, the fused op's cond path on
every backend present, the paper's parameter count, and one end-to-end episode step on CPU."""

import backbone_zoo
import pytest
import timm
import torch
import torch.nn.functional as F

import stadapter_kernels as sk
from stadapter_kernels.reference import oracle
from stadapter.fewshot.model import MACLIP, EpisodeOutput, episode_loss, episode_probabilities

FRAMES, TEXT_DIM = 3, 24


def tiny_timm():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8,
                             embed_dim=32, depth=2, num_heads=2, init_values=0.5).eval()


def eager_parts(family, block):
    """(norm1, attention, norm2, mlp, ls1, ls2) read off the block here, independently of stadapter."""
    if family.startswith("timm"):
        return block.norm1, block.attn, block.norm2, block.mlp, block.ls1, block.ls2

    def attend(x):  # CLIP blocks: nn.MultiheadAttention, batch-first or sequence-first
        if block.attn.batch_first:
            return block.attn(x, x, x, need_weights=False)[0]
        q = x.transpose(0, 1)
        return block.attn(q, q, q, need_weights=False)[0].transpose(0, 1)

    identity = torch.nn.Identity()
    return (block.ln_1, attend, block.ln_2, block.mlp, getattr(block, "ls_1", identity),
            getattr(block, "ls_2", identity))


def aim(adapter, x, cond=None):
    """fc2(gelu(kt=1 tap * (fc1(x) + cond) + tap bias)), written out."""
    y = F.linear(x, adapter.fc1.weight, adapter.fc1.bias)
    if cond is not None:
        y = y + cond.repeat_interleave(x.shape[0] // cond.shape[0], dim=0)[:, None]
    z = y * adapter.conv.weight.flatten() + adapter.conv.bias
    return adapter.scale * F.linear(F.gelu(z), adapter.fc2.weight, adapter.fc2.bias)


def eager_block(model, family, block, adapters, x, text_token):
    norm1, attention, norm2, mlp, ls1, ls2 = eager_parts(family, block)
    videos, tokens = x.shape[0] // FRAMES, x.shape[1]
    extra = []
    if model.temporal == "attention":
        cls = x[:, 0].reshape(videos, FRAMES, -1)
        cls = cls + ls1(aim(adapters["temporal"], attention(norm1(cls))))
        extra.append(cls.reshape(videos * FRAMES, 1, -1))
    else:
        st = adapters["temporal"]
        x = oracle(x, st.fc1.weight, st.fc1.bias, st.conv.weight, st.conv.bias, st.fc2.weight, st.fc2.bias,
                   num_frames=FRAMES, prefix=st.prefix_tokens).to(x.dtype)
    cond = None
    if text_token is not None and model.text == "token":
        extra.append(text_token.repeat_interleave(FRAMES, dim=0)[:, None])
    elif text_token is not None:
        cond = text_token @ adapters["multimodal"].fc1.weight.T
    z = torch.cat([x, *extra], dim=1)
    attended = attention(norm1(z))
    z = z + ls1(attended + aim(adapters["multimodal"], attended, cond))
    x = z[:, :tokens]
    h = norm2(x)
    return x + ls2(mlp(h)) + aim(adapters["joint"], h)


def randomise_adapters(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("adapters.") or name.startswith("text_fcs."):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def available_families():
    """Every family of the lead's zoo of tiny random ViTs whose library is installed."""
    families = []
    for name in backbone_zoo.FAMILIES:
        try:
            backbone_zoo.make(name)
        except ImportError:
            continue
        families.append(name)
    return families


FAMILIES = available_families()


def test_every_supported_family_is_exercised():
    assert {"timm", "open_clip"} <= set(FAMILIES)


# The paper's variant on every family; the other variants on a batch-first and a sequence-first one.
BLOCK_CASES = [(family, "attention", "token") for family in FAMILIES] + [
    (family, temporal, text) for family in ("timm", "open_clip_seq_first") if family in FAMILIES
    for temporal, text in (("attention", "bottleneck"), ("st_adapter", "token"))]


@pytest.mark.parametrize("family,temporal,text", BLOCK_CASES)
@pytest.mark.parametrize("labelled", [True, False])
def test_block_matches_eager_rewrite(family, temporal, text, labelled):
    model = MACLIP(backbone_zoo.make(family), TEXT_DIM, bottleneck=8, temporal=temporal, text=text,
                   tpcm_heads=2, tpcm_hidden=16)
    randomise_adapters(model)
    torch.manual_seed(2)
    shape = (2 * FRAMES, model.spec.tokens, model.spec.width)
    x = torch.randn(shape, requires_grad=True)
    text_feature = torch.randn(2, TEXT_DIM) if labelled else None
    weights = torch.randn(shape)

    def run(block_fn):
        token = None if text_feature is None else model.text_fcs[0](text_feature)
        out = block_fn(token)
        inputs = [x, *model.adapters[0].parameters(), *model.text_fcs[0].parameters()]
        grads = torch.autograd.grad((out * weights).sum(), inputs, allow_unused=True)
        return out, grads

    got, got_grads = run(lambda token: model._block(0, x, FRAMES, token))
    block = model.spec.blocks[0]
    want, want_grads = run(lambda token: eager_block(model, family, block, model.adapters[0], x, token))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, want_grads):
        if w is None:  # the text FC of an unlabelled (query) video
            assert g is None or not g.any()
            continue
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    assert all(g is not None for g in got_grads[:-2])  # x and every adapter tensor get gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_skip_free_variant_is_the_frozen_backbone(family):
    """st_adapter temporal + bottleneck text adds no token and fresh adapters are zero branches:
    the frame features are then the backbone's own class-token features."""
    backbone = backbone_zoo.make(family)
    model = MACLIP(backbone, TEXT_DIM, bottleneck=8, temporal="st_adapter", text="bottleneck",
                   tpcm_heads=2, tpcm_hidden=16)
    size = model.spec.image_size
    clips = torch.randn(2, 3, FRAMES, size, size)
    images = clips.transpose(1, 2).flatten(0, 1)
    with torch.no_grad():
        got = model.frame_features(clips, torch.randn(2, TEXT_DIM))
        if family.startswith("timm"):
            want = backbone.forward_features(images)[:, 0]
            want = model.video_projection(want)
        else:
            want = backbone(images)
    torch.testing.assert_close(got, want.reshape(2, FRAMES, -1), rtol=1e-5, atol=1e-5)


def backends_serving(*args, **kwargs):
    served = []
    for name in sk.BACKEND_PREFERENCE:
        try:
            sk.explain(*args, backend=name, **kwargs)
        except sk.BackendUnavailableError:
            continue
        served.append(name)
    return served


def test_bottleneck_cond_path_matches_reference_on_every_backend():
    model = MACLIP(tiny_timm(), TEXT_DIM, bottleneck=8, text="bottleneck", tpcm_heads=2, tpcm_hidden=16)
    randomise_adapters(model)
    clips, text = torch.randn(2, 3, FRAMES, 32, 32), torch.randn(2, TEXT_DIM)
    multimodal = [adapters["multimodal"] for adapters in model.adapters]

    def features_and_grads(backend):
        for adapter in multimodal:
            adapter.backend = backend
        out = model.frame_features(clips, text)
        grads = torch.autograd.grad(out.square().sum(), [*multimodal[0].parameters(), *model.text_fcs[0].parameters()])
        return out, grads

    want, want_grads = features_and_grads("reference")
    adapter = multimodal[0]
    x = torch.randn(2 * FRAMES, 18, 32)
    cond = torch.randn(2, 8)
    served = backends_serving(x, adapter.fc1.weight, adapter.fc1.bias, adapter.conv.weight, adapter.conv.bias,
                              adapter.fc2.weight, adapter.fc2.bias, num_frames=FRAMES, prefix=0,
                              activation="gelu", cond=cond)
    assert "reference" in served
    for backend in served:
        got, got_grads = features_and_grads(backend)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"{backend}: {m}")
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda m: f"{backend}: {m}")


def test_parameter_count_matches_the_paper():
    """CLIP ViT-B/16, bottleneck 192, 12 text FCs 512 -> 768, one TPCM layer: 18.54M (Table 4)."""
    backbone = timm.create_model("vit_base_patch16_clip_224", pretrained=False, num_classes=512)
    model = MACLIP(backbone, text_dim=512, bottleneck=192)
    tunable = sum(p.numel() for p in model.tunable_parameters().values())
    adapter = (768 * 192 + 192) + (192 + 192) + (192 * 768 + 768)  # fc1, kt = 1 tap and bias, fc2
    text_fc = 512 * 768 + 768
    tpcm = (3 * 512 * 512 + 3 * 512 + 512 * 512 + 512) + (512 * 2048 + 2048 + 2048 * 512 + 512)
    assert model.video_projection is None  # CLIP's own projection gives the 512-d features
    assert tunable == 12 * (3 * adapter + text_fc) + tpcm + 1  # + the logit scale
    assert round(tunable / 1e6, 2) == 18.54
    assert not any(p.requires_grad for p in backbone.parameters())


def test_episode_step_end_to_end():
    model = MACLIP(tiny_timm(), TEXT_DIM, bottleneck=8, tpcm_heads=2, tpcm_hidden=16, metric="otam")
    way, shot = 3, 2
    support, query = torch.randn(way * shot, 3, FRAMES, 32, 32), torch.randn(4, 3, FRAMES, 32, 32)
    class_text = torch.randn(way, TEXT_DIM)
    query_targets, support_targets = torch.tensor([0, 2, 1, 1]), torch.arange(way).repeat_interleave(shot)
    optimizer = torch.optim.AdamW(model.tunable_parameters().values(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.tunable_parameters().items()}
    model.train()
    assert not model.backbone.training
    output = model(support, query, class_text, shot)
    assert output.q2s_distance.shape == output.q2t_logits.shape == (4, way)
    assert output.s2t_logits.shape == (way * shot, way)
    loss = episode_loss(output, query_targets, support_targets, model.alpha)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.backbone.parameters())
    optimizer.step()
    changed = [n for n, p in model.tunable_parameters().items() if not torch.equal(p, before[n])]
    assert any(n.startswith("adapters.0.joint.fc2") for n in changed) and any(n.startswith("tpcm") for n in changed)
    probs = episode_probabilities(output, model.alpha)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))


def test_loss_and_prediction_mix_text_and_alignment():
    distance = torch.tensor([[0.1, 2.0], [1.5, 0.2]])
    q2t, s2t = torch.tensor([[3.0, 0.0], [0.0, 1.0]]), torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    output = EpisodeOutput(distance, q2t, s2t)
    targets = torch.tensor([0, 1])
    want = 0.3 * (F.cross_entropy(s2t, targets) + F.cross_entropy(q2t, targets)) / 2 \
        + 0.7 * F.cross_entropy(-distance, targets)
    torch.testing.assert_close(episode_loss(output, targets, targets, 0.3), want)
    kl = F.kl_div(F.log_softmax(q2t, -1), F.one_hot(targets, 2).float(), reduction="batchmean")
    torch.testing.assert_close(kl, F.cross_entropy(q2t, targets))  # KL to one-hot = cross-entropy
    torch.testing.assert_close(episode_probabilities(output, 0.3),
                               0.3 * q2t.softmax(-1) + 0.7 * (-distance).softmax(-1))
    torch.testing.assert_close(episode_loss(EpisodeOutput(distance), targets, targets, 0.3),
                               F.cross_entropy(-distance, targets))


def test_bad_input():
    model = MACLIP(tiny_timm(), TEXT_DIM, bottleneck=8, tpcm_heads=2, tpcm_hidden=16)
    clips = torch.randn(2, 3, FRAMES, 32, 32)
    with pytest.raises(ValueError, match="support must be float clips \\(videos, 3, frames, height, width\\)"):
        model(clips[0], clips, torch.randn(2, TEXT_DIM), 1)
    with pytest.raises(ValueError, match="support must hold way \\* shot = 2 \\* 2 clips, got 2"):
        model(clips, clips, torch.randn(2, TEXT_DIM), 2)
    with pytest.raises(ValueError, match="class_text must be \\(way, 24\\)"):
        model(clips, clips, torch.randn(2, 7), 1)
    with pytest.raises(ValueError, match="temporal must be one of"):
        MACLIP(tiny_timm(), TEXT_DIM, temporal="conv")
    with pytest.raises(TypeError, match="unsupported backbone"):
        MACLIP(torch.nn.Linear(2, 2), TEXT_DIM)
