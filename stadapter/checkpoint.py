"""Adapter files, and conversions from the formats users bring (official ST-Adapter, OpenAI CLIP).

What a user keeps per task is the trainable tensors (adapters and head) plus the adapter
config, in safetensors: loading one runs no code. Files are written atomically (a temporary
file in the same folder, fsync, rename), so a crash mid-write leaves the previous file whole.
A file that is truncated, foreign, or does not fit the model raises `AdapterFileError` naming
the file and the key, and the model is left exactly as it was.

Outside formats are converted by pure functions recognised by sentinel keys
(`convert_openai_clip`, `split_official_checkpoint`); pickles are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .inject import POSITIONS, AdapterConfig, add_st_adapters, adapter_config, remove_st_adapters

FORMAT = "stadapter.adapters"
FORMAT_VERSION = "1"


class AdapterFileError(ValueError):
    """A file that cannot be loaded into this model; the message names the file and the key."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors `save_adapters` writes: every parameter that requires grad, by its name in `model`."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def adapter_file_bytes(model: nn.Module, extra_metadata: dict[str, str] | None = None) -> bytes:
    """The bytes of `model`'s adapter file (what `save_adapters` writes)."""
    from safetensors.torch import save

    tensors = {name: t.contiguous().cpu() for name, t in trainable_state_dict(model).items()}
    if not tensors:
        raise ValueError("the model has no trainable tensors to save (did add_st_adapters run?)")
    config = adapter_config(model)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "adapter_config": json.dumps(config.to_dict() if config else None)}
    metadata.update(extra_metadata or {})
    return save(tensors, metadata=metadata)


def save_adapters(model: nn.Module, path: str | os.PathLike, extra_metadata: dict[str, str] | None = None) -> None:
    """Write the trainable tensors and the adapter config of `model` to `path` (safetensors), atomically."""
    atomic_write_bytes(path, adapter_file_bytes(model, extra_metadata))


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an adapter file; AdapterFileError if it is not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise AdapterFileError(f"{path}: cannot read the adapter file ({error})") from error
    try:
        tensors = load(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_size]).get("__metadata__") or {}
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise AdapterFileError(f"{path}: not a readable safetensors file (truncated or foreign?): {error}") from error
    if metadata.get("format") != FORMAT:
        raise AdapterFileError(f"{path}: metadata key 'format' is {metadata.get('format')!r}, expected {FORMAT!r}: "
                               "not a stadapter adapter file")
    return tensors, metadata


def _config_from_metadata(path, metadata: dict) -> AdapterConfig | None:
    try:
        raw = json.loads(metadata.get("adapter_config", "null"))
        return None if raw is None else AdapterConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as error:
        raise AdapterFileError(f"{path}: metadata key 'adapter_config' is invalid: {error}") from error


def _check_config(path, saved: AdapterConfig | None, current: AdapterConfig | None) -> None:
    if saved is None or current is None or saved == current:
        return
    for name in AdapterConfig.__dataclass_fields__:
        if getattr(saved, name) != getattr(current, name):
            raise AdapterFileError(f"{path}: adapter_config.{name} is {getattr(saved, name)!r} in the file but "
                                   f"{getattr(current, name)!r} in the model")


def check_fits(path, tensors: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
    """Every target key present with its shape, nothing else: AdapterFileError naming the key otherwise."""
    missing = sorted(set(targets) - set(tensors))
    if missing:
        raise AdapterFileError(f"{path}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                                        if len(missing) > 1 else ""))
    unexpected = sorted(set(tensors) - set(targets))
    if unexpected:
        raise AdapterFileError(f"{path}: unexpected key {unexpected[0]!r} (not a trainable tensor of this model)"
                               + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
    for name, target in targets.items():
        if tuple(tensors[name].shape) != tuple(target.shape):
            raise AdapterFileError(f"{path}: key {name!r} has shape {tuple(tensors[name].shape)} in the file but "
                                   f"{tuple(target.shape)} in the model")
        if not tensors[name].is_floating_point():
            raise AdapterFileError(f"{path}: key {name!r} has dtype {tensors[name].dtype}, expected a float tensor")


def load_adapters(model: nn.Module, path: str | os.PathLike) -> AdapterConfig | None:
    """Load an adapter file written by `save_adapters` into `model`; returns the file's adapter config.

    A model without adapters gets them first, as the file's config says. Every check runs before
    any tensor is copied, so on error the model is unchanged.
    """
    tensors, metadata = read_adapter_file(path)
    saved = _config_from_metadata(path, metadata)
    injected = False
    if adapter_config(model) is None and saved is not None:
        add_st_adapters(model, positions=saved.positions, layers=list(saved.layers), bottleneck=saved.bottleneck,
                        kernel_t=saved.kernel_t, activation=saved.activation, scale=saved.scale)
        injected = True
    try:
        _check_config(path, saved, adapter_config(model))
        targets = dict(trainable_state_dict(model))
        check_fits(path, tensors, targets)
    except AdapterFileError:
        if injected:
            remove_st_adapters(model)
        raise
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return saved


# ---- outside formats ---------------------------------------------------------------------------

def read_untrusted_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, a torch.save pickle (weights only) or a TorchScript archive.

    A pickle that holds a dict with a "model", "state_dict" or "module" entry is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            scripted = any(name.endswith("constants.pkl") for name in archive.namelist())
        if scripted:  # OpenAI's released CLIP files are TorchScript archives
            return {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise AdapterFileError(f"{path}: cannot read it as weights ({type(error).__name__}: {error})") from error
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise AdapterFileError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items()}


#: OpenAI CLIP's vision-tower names -> timm VisionTransformer names (applied in order).
_OPENAI_TO_TIMM = (
    ("conv1.", "patch_embed.proj."), ("positional_embedding", "pos_embed"), ("class_embedding", "cls_token"),
    ("transformer.resblocks.", "blocks."), ("ln_pre.", "norm_pre."), ("ln_post.", "norm."),
    (".ln_1.", ".norm1."), (".ln_2.", ".norm2."), (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."),
    (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."),
)


def openai_visual_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The vision tower of an OpenAI CLIP state dict (keys `visual.*`, or already without the prefix)."""
    if "visual.class_embedding" in state:
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if "class_embedding" in state:
        return dict(state)
    raise AdapterFileError("not an OpenAI CLIP state dict: neither 'visual.class_embedding' nor 'class_embedding' "
                           "is a key")


def convert_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP vision weights -> a timm VisionTransformer state dict (its `head` holds `proj`)."""
    out = {}
    for key, value in openai_visual_state(state).items():
        if key == "proj":
            out["head.weight"] = value.T.contiguous()
            out["head.bias"] = torch.zeros(value.shape[1], dtype=value.dtype)
            continue
        for old, new in _OPENAI_TO_TIMM:
            key = key.replace(old, new)
        if key == "cls_token":
            value = value.reshape(1, 1, -1)
        elif key == "pos_embed":
            value = value.unsqueeze(0)
        out[key] = value
    return out


def openai_clip_hyperparameters(state: dict[str, torch.Tensor]) -> dict:
    """Sizes of the vision tower, read off its tensors."""
    visual = openai_visual_state(state)
    width, _, patch, _ = visual["conv1.weight"].shape
    grid = round((visual["positional_embedding"].shape[0] - 1) ** 0.5)
    depth = len({k.split(".")[2] for k in visual if k.startswith("transformer.resblocks.")})
    return dict(img_size=grid * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=width // 64,
                num_classes=visual["proj"].shape[1] if "proj" in visual else 0)


def build_timm_clip_vit(state: dict[str, torch.Tensor]) -> nn.Module:
    """A timm VisionTransformer shaped and initialised as OpenAI CLIP's vision tower in `state`."""
    from timm.models.vision_transformer import VisionTransformer

    vit = VisionTransformer(**openai_clip_hyperparameters(state), pre_norm=True, norm_layer=nn.LayerNorm,
                            act_layer="quick_gelu", global_pool="token")
    converted = convert_openai_clip(state)
    result = vit.load_state_dict(converted, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise AdapterFileError(f"CLIP weights do not fit a CLIP ViT: missing {result.missing_keys[:5]}, "
                               f"unexpected {result.unexpected_keys[:5]}")
    return vit


_OFFICIAL_ADAPTER_KEY = re.compile(r"^transformer\.resblocks\.(\d+)\.adapter_(pre_attn|pre_mlp)\.(.+)$")
_OFFICIAL_HEAD = ("fc.weight", "fc.bias")


def split_official_checkpoint(state: dict[str, torch.Tensor], path="checkpoint") -> tuple[AdapterConfig, dict, dict]:
    """An official ST-Adapter checkpoint's tensors -> (config, adapter tensors by (block, position, name), head).

    Positions, blocks, width and kt are read off the tensors; anything else is an error naming the key.
    """
    adapters, head = {}, {}
    for key, value in state.items():
        match = _OFFICIAL_ADAPTER_KEY.match(key)
        if match:
            adapters[int(match.group(1)), match.group(2), match.group(3)] = value
        elif key in _OFFICIAL_HEAD:
            head[key.split(".")[1]] = value
        else:
            raise AdapterFileError(f"{path}: key {key!r} is neither an adapter tensor "
                                   "(transformer.resblocks.N.adapter_pre_attn|pre_mlp.*) nor the head (fc.*); "
                                   "pass the CLIP weights separately as clip_weights")
    if not adapters:
        raise AdapterFileError(f"{path}: no adapter tensors (transformer.resblocks.N.adapter_*) in the checkpoint")
    if set(head) != {"weight", "bias"}:
        raise AdapterFileError(f"{path}: missing key 'fc.{({'weight', 'bias'} - set(head)).pop()}' (the head)")
    layers = sorted({block for block, _, _ in adapters})
    positions = tuple(p for p in POSITIONS if any(pos == p for _, pos, _ in adapters))
    for block in layers:
        for position in positions:
            if (block, position, "fc1.weight") not in adapters:
                raise AdapterFileError(f"{path}: missing key 'transformer.resblocks.{block}.adapter_{position}."
                                       "fc1.weight' (every adapted block must have the same positions)")
    first = adapters[layers[0], positions[0], "fc1.weight"]
    kernel = adapters[layers[0], positions[0], "conv.weight"]
    config = AdapterConfig(positions=positions, layers=tuple(layers), bottleneck=first.shape[0],
                           kernel_t=kernel.shape[2], activation="identity")
    return config, adapters, head


def official_adapter_key(block: int, position: str, name: str) -> str:
    return f"transformer.resblocks.{block}.adapter_{position}.{name}"


__all__ = ["AdapterFileError", "FORMAT", "atomic_write_bytes", "build_timm_clip_vit", "check_fits",
           "convert_openai_clip", "load_adapters", "official_adapter_key", "read_adapter_file",
           "read_untrusted_weights", "save_adapters", "split_official_checkpoint", "trainable_state_dict"]
