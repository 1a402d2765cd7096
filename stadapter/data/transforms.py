"""Spatial transforms of a clip, kept in uint8 until the batch is normalised.

The geometry of a clip (resize, crop box, flip) is chosen once from the video's size and then
applied to every frame: the resize happens in PyAV's converter while decoding, the crop and
flip are numpy slices, and `normalize_clips` turns a uint8 batch into float on the device,
so a worker moves a quarter of the bytes a float pipeline would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

# OpenAI CLIP's normalisation, used by the CLIP backbones the official models build on.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Geometry:
    """Resize to (width, height), crop a crop x crop square at (left, top), then maybe flip."""

    width: int
    height: int
    left: int
    top: int
    crop: int
    flip: bool = False


def _resized(width: int, height: int, short_side: int) -> tuple[int, int]:
    # Even sizes keep swscale on its fast paths; the crop never exceeds the short side.
    if width <= height:
        return short_side, max(short_side, int(round(height * short_side / width)))
    return max(short_side, int(round(width * short_side / height))), short_side


def train_geometry(width: int, height: int, crop: int, scale: tuple[int, int], flip: bool,
                   rng: np.random.Generator) -> Geometry:
    """Random short side in [scale[0], scale[1]] (scale jitter), random crop, flip with p = 0.5
    if `flip`."""
    low, high = scale
    if not crop <= low <= high:
        raise ValueError(f"train scale must satisfy crop <= low <= high, got crop={crop}, scale={scale}")
    new_w, new_h = _resized(width, height, int(rng.integers(low, high + 1)))
    left = int(rng.integers(0, new_w - crop + 1))
    top = int(rng.integers(0, new_h - crop + 1))
    return Geometry(new_w, new_h, left, top, crop, bool(flip and rng.random() < 0.5))


def view_geometries(width: int, height: int, crop: int, scale: int, num_views: int) -> list[Geometry]:
    """Short side `scale`, then `num_views` crops spread evenly along the long side (one view:
    the centre; three: the official left / centre / right, or top / centre / bottom)."""
    if scale < crop:
        raise ValueError(f"test scale must be >= crop, got scale={scale}, crop={crop}")
    new_w, new_h = _resized(width, height, scale)
    spare_x, spare_y = new_w - crop, new_h - crop
    views = []
    for view in range(num_views):
        fraction = 0.5 if num_views == 1 else view / (num_views - 1)
        along_x = spare_x >= spare_y
        left = int(round(spare_x * fraction)) if along_x else spare_x // 2
        top = spare_y // 2 if along_x else int(round(spare_y * fraction))
        views.append(Geometry(new_w, new_h, left, top, crop))
    return views


def apply_geometry(frames: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """Crop and flip frames (T, H, W, 3) already resized to the geometry's size; returns uint8
    (3, T, crop, crop), the channel-first clip layout of `VideoViT`."""
    if frames.shape[1:3] != (geometry.height, geometry.width):
        raise ValueError(f"frames are {frames.shape[2]}x{frames.shape[1]}, geometry expects "
                         f"{geometry.width}x{geometry.height}")
    g = geometry
    clip = frames[:, g.top:g.top + g.crop, g.left:g.left + g.crop]
    if g.flip:
        clip = clip[:, :, ::-1]
    return torch.from_numpy(np.ascontiguousarray(clip.transpose(3, 0, 1, 2)))


def normalize_clips(clips: torch.Tensor, mean=CLIP_MEAN, std=CLIP_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 clips (..., 3, T, H, W) -> `dtype`, (x / 255 - mean) / std per channel."""
    if clips.dtype != torch.uint8:
        raise TypeError(f"clips must be uint8 (normalised once, here), got {clips.dtype}")
    if clips.dim() < 4 or clips.shape[-4] != 3:
        raise ValueError(f"clips must be (..., 3, T, H, W), got {tuple(clips.shape)}")
    shape = (3, 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=clips.device).view(shape) * 255.0
    inv_std = 1.0 / (torch.tensor(std, dtype=torch.float32, device=clips.device).view(shape) * 255.0)
    return ((clips.float() - mean_t) * inv_std).to(dtype)
