"""TPCM against its formula written out here, prototypes, and the text encoders."""

import os

import pytest
import torch
import torch.nn.functional as F

from stadapter.fewshot.text import PROMPT, CLIPTextEncoder, SentenceEncoder, build_text_encoder, prompts
from stadapter.fewshot.tpcm import TPCM, prototypes


def attention_by_hand(mha, q, k, v):
    """Multi-head attention from MultiheadAttention's weights, written out."""
    dim, heads = mha.embed_dim, mha.num_heads
    wq, wk, wv = mha.in_proj_weight.chunk(3)
    bq, bk, bv = mha.in_proj_bias.chunk(3)
    split = lambda t: t.unflatten(-1, (heads, dim // heads)).transpose(1, 2)
    qh, kh, vh = split(q @ wq.T + bq), split(k @ wk.T + bk), split(v @ wv.T + bv)
    weights = (qh @ kh.transpose(-1, -2) / (dim // heads) ** 0.5).softmax(-1)
    return (weights @ vh).transpose(1, 2).flatten(-2) @ mha.out_proj.weight.T + mha.out_proj.bias


def test_tpcm_support_and_query_paths_match_the_formula():
    torch.manual_seed(0)
    layer = TPCM(16, heads=4, hidden=32).eval()
    frames, text = torch.randn(3, 5, 16), torch.randn(3, 16)
    ffn = lambda h: layer.ffn[3](F.gelu(layer.ffn[0](h)))

    q = frames + text[:, None]
    kv = torch.cat([text[:, None], frames], 1)
    h = attention_by_hand(layer.attention, q, kv, kv) + q
    torch.testing.assert_close(layer(frames, text), ffn(h) + h)

    h = attention_by_hand(layer.attention, frames, frames, frames) + frames
    torch.testing.assert_close(layer(frames), ffn(h) + h)


def test_tpcm_bad_input():
    layer = TPCM(16, heads=4, hidden=32)
    with pytest.raises(ValueError, match="frames must be \\(videos, frames, 16\\)"):
        layer(torch.randn(5, 16))
    with pytest.raises(ValueError, match="text must be \\(3, 16\\)"):
        layer(torch.randn(3, 5, 16), torch.randn(2, 16))
    with pytest.raises(ValueError, match="divisible by heads"):
        TPCM(10, heads=4)


def test_prototypes_average_shots_class_major():
    support = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(6, 2, 2)  # way 2, shot 3
    protos = prototypes(support, way=2, shot=3)
    torch.testing.assert_close(protos[1], support[3:].mean(0))
    with pytest.raises(ValueError, match="way \\* shot = 4"):
        prototypes(support, way=2, shot=2)


def test_prompts():
    assert PROMPT == "a video of {name}"
    assert prompts(["a 3 moving left"]) == ["a video of a 3 moving left"]


@pytest.fixture(scope="module")
def sentence_encoder():
    return SentenceEncoder()


def test_sentence_encoder_is_offline_frozen_and_reads_meaning(sentence_encoder):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    features = sentence_encoder(prompts(["a 3 moving left", "a 3 moving right", "a 7 moving up"]))
    assert features.shape == (3, sentence_encoder.dim) == (3, 384)
    assert not any(p.requires_grad for p in sentence_encoder.parameters())
    torch.testing.assert_close(features, sentence_encoder(prompts(["a 3 moving left", "a 3 moving right",
                                                                   "a 7 moving up"])))
    cosine = F.normalize(features, dim=-1) @ F.normalize(features, dim=-1).T
    assert cosine[0, 1] > cosine[0, 2]  # same digit, mirrored motion: closer than another digit
    with pytest.raises(ValueError, match="texts must be a non-empty list of strings"):
        sentence_encoder("a video of a 3")


TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"layers": 1, "width": 32, "head_width": 16, "patch_size": 8, "image_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


def tiny_open_clip():
    import open_clip

    torch.manual_seed(0)
    return open_clip.CLIP(**TINY_CLIP)


def test_clip_text_encoder_wraps_encode_text():
    import open_clip

    model = tiny_open_clip()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    encoder = CLIPTextEncoder(model, lambda texts: tokenizer(texts, context_length=16))
    texts = prompts(["a 1 moving up", "a 2 moving down"])
    assert encoder.dim == 32
    with torch.no_grad():
        want = model.encode_text(tokenizer(texts, context_length=16))
    torch.testing.assert_close(encoder(texts), want)
    assert not any(p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.training


def test_clip_text_encoder_from_open_clip_local_file(tmp_path):
    import json

    import open_clip

    # A registered tiny config stands in for ViT-B-32 (same loading path, a fraction of the time).
    (tmp_path / "stadapter-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "stadapter-tiny-clip.json")
    model = tiny_open_clip()
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    encoder = build_text_encoder("open_clip:stadapter-tiny-clip", str(path))
    assert encoder.dim == 32
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(encoder.model.state_dict()[name], tensor)
    with pytest.raises(FileNotFoundError, match="local CLIP checkpoint file"):
        build_text_encoder("open_clip:stadapter-tiny-clip", str(tmp_path / "missing.pt"))
    with pytest.raises(ValueError, match="text encoder must be 'minilm' or 'open_clip:<model name>'"):
        build_text_encoder("bert")
