"""Tiny random ViTs of every supported family, each built from its own library's classes, and a
test-local rewrite of their blocks with the official ST-Adapter data flow, to hold injection to.

OpenAI CLIP's `clip/model.py` is loaded as a file: the PyPI package's `clip/__init__.py` imports
`pkg_resources`, which current setuptools no longer ships, and only the model file is needed.
"""

from __future__ import annotations

import copy
import importlib.util
import types
from pathlib import Path

import torch
from torch import nn

WIDTH, HEADS, DEPTH, IMAGE, PATCH = 40, 4, 3, 16, 4  # C = 40: not a power of two


def openai_clip_module():
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("OpenAI's CLIP package (clip-anytorch, in the [test] extra) is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.py"
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def timm_vit(reg_tokens: int = 0, depth: int = DEPTH):
    from timm.models.vision_transformer import VisionTransformer
    return VisionTransformer(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=depth, num_heads=HEADS,
                             num_classes=0, reg_tokens=reg_tokens, pre_norm=True, init_values=0.5)


def open_clip_vit(batch_first: bool = True):
    """open_clip 3.x builds batch-first towers; older releases ran sequence-first, which its
    `Transformer(batch_first=False)` still builds, so that tower is swapped in for the other case."""
    from open_clip.transformer import Transformer, VisionTransformer
    vit = VisionTransformer(image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH, heads=HEADS, mlp_ratio=2.0,
                            output_dim=24)
    if not batch_first:
        vit.transformer = Transformer(WIDTH, DEPTH, HEADS, mlp_ratio=2.0, batch_first=False)
    return vit


def openai_vit():
    return openai_clip_module().VisionTransformer(input_resolution=IMAGE, patch_size=PATCH, width=WIDTH, layers=DEPTH,
                                                  heads=HEADS, output_dim=24)


FAMILIES = {
    "timm": timm_vit,
    "timm_registers": lambda: timm_vit(reg_tokens=2),
    "open_clip": open_clip_vit,
    "open_clip_seq_first": lambda: open_clip_vit(batch_first=False),
    "openai": openai_vit,
}


def make(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    with torch.no_grad():  # make every norm and bias matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


class OfficialAdapter(nn.Module):
    """The official ST-Adapter module's data flow: fc1, permute to channels-first, depthwise Conv3d,
    permute back, fc2, in-place residual on the patch tokens. Takes (B*T, L, C)."""

    def __init__(self, dim, bottleneck, kernel_t, prefix):
        super().__init__()
        self.prefix = prefix
        self.fc1 = nn.Linear(dim, bottleneck)
        self.conv = nn.Conv3d(bottleneck, bottleneck, (kernel_t, 1, 1), padding=(kernel_t // 2, 0, 0),
                              groups=bottleneck)
        self.fc2 = nn.Linear(bottleneck, dim)

    def forward(self, x, num_frames):
        bt, tokens, _ = x.shape
        batch, patches, ca, p = bt // num_frames, tokens - self.prefix, self.conv.in_channels, self.prefix
        x_id = x.clone()  # the official module adds in place; a clone keeps autograd happy on leaves
        h = self.fc1(x[:, p:, :])
        # (patches, 1) for the official (H, W): the (kt, 1, 1) kernel never mixes patches.
        h = h.view(batch, num_frames, patches, 1, ca).permute(0, 4, 1, 2, 3).contiguous()
        h = self.conv(h)
        h = h.permute(0, 2, 3, 4, 1).contiguous().view(bt, patches, ca)
        x_id[:, p:, :] += self.fc2(h)
        return x_id


def official_rewrite(adapted: nn.Module, family: str, num_frames: int) -> tuple[nn.Module, dict]:
    """(reference, {(block, position): official adapter}): a copy of `adapted`'s backbone as it was before injection, whose blocks call official-flow
    adapters (holding the same weights) at the same places; sequence-first blocks convert to
    batch-first and back around each adapter, as the official code's own batch-first flow has it."""
    import stadapter
    from stadapter.backbones import find_backbone
    from stadapter.inject import CHILD_NAMES

    reference = copy.deepcopy(adapted)
    recipe = find_backbone(reference)
    adapters = {}
    for index, block in enumerate(recipe.blocks):
        for position, name in CHILD_NAMES.items():
            if name in block._modules:
                ours = block._modules[name]
                official = OfficialAdapter(ours.dim, ours.bottleneck, ours.kernel_t, ours.prefix_tokens)
                official.load_state_dict(ours.state_dict())
                adapters[index, position] = official.to(next(ours.parameters()).dtype)
    stadapter.remove_st_adapters(reference)
    sequence_first = recipe.layout == "lnc"

    def call(index, position, block, x):
        official = adapters.get((index, position))
        if official is None:
            return x
        if sequence_first:
            return official(x.transpose(0, 1), num_frames).transpose(0, 1)
        return official(x, num_frames)

    for index, block in enumerate(find_backbone(reference).blocks):
        block.official_adapters = nn.ModuleList([m for (i, _), m in adapters.items() if i == index])
        block.forward = types.MethodType(_rewritten_forward(family, index, call), block)
    return reference, adapters


def _rewritten_forward(family, index, call):
    if family.startswith("timm"):
        def forward(self, x, attn_mask=None, is_causal=False):
            x = call(index, "pre_attn", self, x)
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            x = call(index, "pre_mlp", self, x)
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    elif family.startswith("open_clip"):
        def forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
            x = call(index, "pre_attn", self, q_x)
            x = x + self.ls_1(self.attention(q_x=self.ln_1(x), attn_mask=attn_mask))
            x = call(index, "pre_mlp", self, x)
            return x + self.ls_2(self.mlp(self.ln_2(x)))
    else:
        def forward(self, x):
            x = call(index, "pre_attn", self, x)
            x = x + self.attention(self.ln_1(x))
            x = call(index, "pre_mlp", self, x)
            return x + self.mlp(self.ln_2(x))
    return forward


def perturb_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Trained-looking adapters: every adapter weight and bias random and non-zero."""
    from stadapter import STAdapter

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, STAdapter):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=generator).to(p.dtype) * std)
