"""Moving digits: small video classes that only time tells apart, written as mp4 files.

A class is a motion, optionally of one digit (`MotionClass("left", digit=3)` is "a 3 moving
left"). Digits are scikit-learn's bundled 8 x 8 handwritten digits (offline), upscaled and
moved over a black canvas. Motions come in pairs drawn from one path distribution: "left" is
"right" played backwards, "counterclockwise" is "clockwise" backwards, and "left and back" is
"right and back" mirrored (a there-and-back path reads the same backwards). Within a pair the
frames of a video are spread over the same places, so the set of its frames - and any average
over them - says nothing about which of the pair it is; only their order does.

Train and test videos use disjoint handwriting samples (`split`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stadapter.data import write_video

# motion -> (path, flipped): the path maps progress s in [0, 1] and the video's random path
# parameters to positions in [0, 1]^2 (fractions of the free range of the canvas); flipped
# plays it backwards, or for the there-and-back path (a palindrome in time) mirrors it.
MOTIONS = {
    "right": ("horizontal", False),
    "left": ("horizontal", True),
    "down": ("vertical", False),
    "up": ("vertical", True),
    "clockwise": ("circle", False),
    "counterclockwise": ("circle", True),
    "right and back": ("horizontal_and_back", False),
    "left and back": ("horizontal_and_back", True),
}
SPLITS = ("train", "test")


@dataclass(frozen=True)
class MotionClass:
    """One class: `motion` (a key of `MOTIONS`) of a given `digit`, or of any digit (None)."""

    motion: str
    digit: int | None = None

    def __post_init__(self):
        if self.motion not in MOTIONS:
            raise ValueError(f"motion must be one of {tuple(MOTIONS)}, got {self.motion!r}")
        if self.digit is not None and self.digit not in range(10):
            raise ValueError(f"digit must be 0-9 or None, got {self.digit!r}")

    @property
    def name(self) -> str:
        """Text for the class, e.g. "a 3 moving left" or "a digit moving clockwise"."""
        return f"a {'digit' if self.digit is None else self.digit} moving {self.motion}"


@lru_cache(maxsize=None)
def digit_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits of `split` as float images in [0, 1] (N, 8, 8) and labels (N,):
    every fifth sample is "test", the rest "train"."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    keep = (np.arange(len(digits.target)) % 5 == 0) == (split == "test")
    return digits.images[keep] / 16.0, digits.target[keep]


def _draw_path(rng: np.random.Generator) -> dict:
    # The same draws for both motions of a pair, so a pair shares one path distribution.
    return {"lane": rng.uniform(0.0, 1.0), "start": rng.uniform(0.0, 0.15), "end": rng.uniform(0.85, 1.0),
            "phase": rng.uniform(0.0, 2 * math.pi), "radius": rng.uniform(0.35, 0.5)}


def positions(motion: str, num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """(num_frames, 2) positions (x, y) in [0, 1] of one random video of `motion`."""
    path, flipped = MOTIONS[motion]
    p = _draw_path(rng)
    s = np.linspace(0.0, 1.0, num_frames)
    if flipped and path != "horizontal_and_back":
        s = s[::-1]
    sweep = p["start"] + (p["end"] - p["start"]) * s
    if path == "horizontal":
        xy = np.stack([sweep, np.full_like(s, p["lane"])], 1)
    elif path == "vertical":
        xy = np.stack([np.full_like(s, p["lane"]), sweep], 1)
    elif path == "horizontal_and_back":
        out = (p["end"] - p["start"]) * (1 - np.abs(2 * s - 1))
        there_and_back = p["end"] - out if flipped else p["start"] + out
        xy = np.stack([there_and_back, np.full_like(s, p["lane"])], 1)
    else:
        angle = p["phase"] + 2 * math.pi * s
        xy = 0.5 + p["radius"] * np.stack([np.cos(angle), np.sin(angle)], 1)
    return np.clip(xy, 0.0, 1.0)


def place_digit(image: np.ndarray, xy, size: int, digit_size: int) -> np.ndarray:
    """A (size, size, 3) uint8 frame with the 8 x 8 `image` scaled to `digit_size` at `xy`."""
    scale = digit_size // 8
    sprite = np.kron(image, np.ones((scale, scale)))
    free = size - sprite.shape[0]
    left, top = int(round(xy[0] * free)), int(round(xy[1] * free))
    frame = np.zeros((size, size), np.float64)
    frame[top:top + sprite.shape[0], left:left + sprite.shape[1]] = sprite
    return np.repeat((frame * 255).astype(np.uint8)[..., None], 3, axis=2)


def render_video(cls: MotionClass, num_frames: int, size: int, digit_size: int, rng: np.random.Generator,
                 split: str = "train") -> np.ndarray:
    """(num_frames, size, size, 3) uint8 frames of one random video of class `cls`."""
    images, labels = digit_images(split)
    pool = np.flatnonzero(labels == cls.digit) if cls.digit is not None else np.arange(len(labels))
    image = images[rng.choice(pool)]
    return np.stack([place_digit(image, xy, size, digit_size) for xy in positions(cls.motion, num_frames, rng)])


def _check_sizes(size: int, digit_size: int) -> None:
    if digit_size < 8 or digit_size % 8:
        raise ValueError(f"digit_size must be a positive multiple of 8, got {digit_size}")
    if size % 2 or size <= digit_size:
        raise ValueError(f"size must be even and larger than digit_size ({digit_size}), got {size}")


def class_folder(label: int, cls: MotionClass) -> str:
    """Folder of class `label`: the label first, so sorted folders keep the class order."""
    return f"{label:02d}_{cls.name.replace(' ', '_')}"


def write_moving_digits(root: str, classes, videos_per_class: int, *, num_frames: int = 16, size: int = 32,
                        digit_size: int = 16, fps: int = 8, split: str = "train", seed: int = 0,
                        codec: str = "mpeg4") -> list[tuple[str, int]]:
    """Write `videos_per_class` mp4 videos per class under `root`, one folder per class (the
    folder-tree format `VideoDataset.from_folder` reads, labels in the order of `classes`), and
    `root/classes.json` with the class names. Returns the (path, label) pairs.

    `classes`: `MotionClass` objects or motion names. Reproducible from `seed`; use another
    seed and `split="test"` for a test set. `codec`: mpeg4 writes these tiny videos about five
    times faster than libx264 (see `stadapter.data.write_video`).
    """
    classes = [c if isinstance(c, MotionClass) else MotionClass(c) for c in classes]
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be distinct and non-empty, got {[c.name for c in classes]}")
    if videos_per_class < 1 or num_frames < 2:
        raise ValueError(f"need videos_per_class >= 1 and num_frames >= 2, got {videos_per_class}, {num_frames}")
    _check_sizes(size, digit_size)
    digit_images(split)  # checks the split name before any file is written
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    samples = []
    for label, cls in enumerate(classes):
        folder = os.path.join(root, class_folder(label, cls))
        os.makedirs(folder, exist_ok=True)
        for i in range(videos_per_class):
            path = os.path.join(folder, f"{i:05d}.mp4")
            write_video(path, render_video(cls, num_frames, size, digit_size, rng, split), fps=fps, codec=codec)
            samples.append((path, label))
    with open(os.path.join(root, "classes.json"), "w") as handle:
        json.dump([c.name for c in classes], handle, indent=1)
    return samples


def random_frames(count: int, size: int, digit_size: int, rng: np.random.Generator,
                  split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """`count` single frames (count, size, size, 3) uint8, one digit anywhere on each, and the
    digits (count,): the frame ViT's pretraining data."""
    _check_sizes(size, digit_size)
    images, labels = digit_images(split)
    chosen = rng.integers(0, len(labels), size=count)
    frames = np.stack([place_digit(images[i], rng.uniform(0, 1, 2), size, digit_size) for i in chosen])
    return frames, labels[chosen]
