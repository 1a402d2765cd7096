"""torch.compile(fullgraph=True) traces a model using STAdapter with no graph break, forward
and backward, and matches eager."""

import pytest
import torch
from torch import nn

from parity import rel_error
from stadapter import STAdapter


class TinyVideoBlock(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = nn.Linear(40, 40)
        self.adapter = STAdapter(40, 24, activation="gelu", backend=backend)
        for p in self.adapter.parameters():  # leave the identity initialisation: every term counts
            nn.init.normal_(p, std=0.2)

    def forward(self, x, num_frames: int):
        return self.adapter(self.proj(x), num_frames=num_frames).square().mean()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    torch._dynamo.reset()
    model = TinyVideoBlock(backend)
    x = torch.randn(6, 9, 40, requires_grad=True)
    eager = model(x, 3)
    eager_grads = torch.autograd.grad(eager, [x, *model.parameters()])

    compiled = torch.compile(model, fullgraph=True)
    actual = compiled(x, 3)
    actual_grads = torch.autograd.grad(actual, [x, *model.parameters()])
    assert rel_error(actual, eager) < 1e-5
    for a, e in zip(actual_grads, eager_grads):
        assert rel_error(a, e) < 1e-5


# Inductor on one family; the sequence-first family through aot_eager, which traces the same graph
# (no break allowed) without inductor's code generation, the slow part on a 2-core machine.
@pytest.mark.parametrize("family, compiler", [("timm", "inductor"), ("openai", "aot_eager")])
def test_compile_fullgraph_video_model_matches_eager(family, compiler):
    from backbone_zoo import IMAGE, make, perturb_adapters
    from stadapter.models import VideoViT

    torch._dynamo.reset()
    model = VideoViT(make(family), num_classes=3, num_frames=2, dropout=0.0, positions=("pre_attn", "pre_mlp"),
                     bottleneck=8)
    perturb_adapters(model)
    clips = torch.randn(2, 3, 2, IMAGE, IMAGE)
    trainable = [p for p in model.parameters() if p.requires_grad]
    eager = model(clips).square().sum()
    eager_grads = torch.autograd.grad(eager, trainable)
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    actual = compiled(clips).square().sum()
    actual_grads = torch.autograd.grad(actual, trainable)
    assert rel_error(actual, eager) < 1e-5
    for a, e in zip(actual_grads, eager_grads):
        assert rel_error(a, e) < 1e-5
