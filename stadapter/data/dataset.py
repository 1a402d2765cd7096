"""`VideoDataset`: labelled video files -> uint8 clips, for training and multi-view testing.

Sources: the official list format (`<path> <label>` per line, paths relative to a root), a
folder tree (one subfolder per class, classes in sorted order), or a CSV with `path` and
`label` columns (integer labels, or class names mapped in sorted order).

A file that cannot be decoded never stops a run: the sample is replaced by the next one, a
warning names the file, and the sample carries the skipped path so the trainer can count it
(workers run in other processes, so a counter on the dataset would not reach the trainer).
`strict=True` instead checks every file when the dataset is made and raises on the first bad one.
"""

from __future__ import annotations

import csv
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .decode import VideoDecodeError, probe, read_frames
from .sampling import SAMPLINGS, sample_indices
from .transforms import apply_geometry, view_geometries, train_geometry

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v")


class VideoSkippedWarning(UserWarning):
    """A video was skipped because it could not be decoded."""


@dataclass
class ClipConfig:
    """How a clip is cut from a video (the official flags in brackets).

    num_frames: frames per clip (`--num_frames`).
    sampling: "uniform" (TSN segments) or "dense" (`--sampling_rate` apart).
    sampling_rate: frame step of "dense" sampling.
    crop_size: side of the square crop (`--input_size`).
    train_scale: range of the random short side in training (scale jitter).
    test_scale: short side at test time; None means `crop_size`.
    flip: random horizontal flip in training (turn off for direction-sensitive classes, SSv2).
    num_temporal_views, num_spatial_views: test views per video, scores averaged
        (`--num_temporal_views`, `--num_spatial_views`).
    """

    num_frames: int = 8
    sampling: str = "uniform"
    sampling_rate: int = 8
    crop_size: int = 224
    train_scale: tuple[int, int] = (256, 320)
    test_scale: int | None = None
    flip: bool = True
    num_temporal_views: int = 1
    num_spatial_views: int = 1

    def __post_init__(self):
        self.train_scale = tuple(int(v) for v in self.train_scale)
        for name in ("num_frames", "sampling_rate", "crop_size", "num_temporal_views", "num_spatial_views"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {self.sampling!r}")
        if len(self.train_scale) != 2 or not self.crop_size <= self.train_scale[0] <= self.train_scale[1]:
            raise ValueError(f"train_scale must be (low, high) with crop_size <= low <= high, "
                             f"got {self.train_scale} for crop_size {self.crop_size}")
        if self.test_scale is not None and self.test_scale < self.crop_size:
            raise ValueError(f"test_scale must be >= crop_size, got {self.test_scale} < {self.crop_size}")

    @property
    def num_views(self) -> int:
        return self.num_temporal_views * self.num_spatial_views


def _read_list(list_file: str, root: str | None) -> list[tuple[str, int]]:
    samples = []
    with open(list_file) as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or int(parts[1]) < 0:
                raise ValueError(f"{list_file}:{number}: expected '<path> <label>' with a label >= 0, got {line!r}")
            samples.append((os.path.join(root, parts[0]) if root else parts[0], int(parts[1])))
    if not samples:
        raise ValueError(f"{list_file}: no samples")
    return samples


def _read_csv(csv_file: str, root: str | None) -> tuple[list[tuple[str, int]], list[str] | None]:
    with open(csv_file, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_file}: needs a header with 'path' and 'label' columns, got {reader.fieldnames}")
        rows = [(row["path"], row["label"].strip()) for row in reader]
    if not rows:
        raise ValueError(f"{csv_file}: no samples")
    paths = [os.path.join(root, path) if root else path for path, _ in rows]
    if all(label.isdigit() for _, label in rows):
        return list(zip(paths, (int(label) for _, label in rows))), None
    names = sorted({label for _, label in rows})
    return list(zip(paths, (names.index(label) for _, label in rows))), names


def _read_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    names = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    samples = []
    for label, name in enumerate(names):
        for entry in sorted(os.scandir(os.path.join(root, name)), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(VIDEO_EXTENSIONS):
                samples.append((entry.path, label))
    if not samples:
        raise ValueError(f"{root}: no video files ({', '.join(VIDEO_EXTENSIONS)}) in class subfolders")
    return samples, names


class VideoDataset(torch.utils.data.Dataset):
    """Clips of labelled videos.

    Item i is a dict: "clip" uint8 (3, T, H, W) in training, (V, 3, T, H, W) at test time with
    V = temporal x spatial views; "label" (int); "index" (the sample actually returned, which
    differs from i only after a skip); "skipped" (paths that failed on the way).

    Args:
        samples: (path, label) pairs.
        clip: a `ClipConfig`.
        train: random sampling and augmentation (else the deterministic test views).
        class_names: optional, index = label.
        seed: training randomness is drawn from (seed, epoch, index), see `set_epoch`.
        strict: check that every file decodes now, raising `VideoDecodeError` on the first.
        max_skips: consecutive undecodable samples tolerated before giving up.
    """

    def __init__(self, samples, clip: ClipConfig | None = None, train: bool = True, class_names=None,
                 seed: int = 0, strict: bool = False, max_skips: int = 20):
        self.samples = [(os.fspath(path), int(label)) for path, label in samples]
        if not self.samples:
            raise ValueError("VideoDataset needs at least one sample")
        self.clip = clip if clip is not None else ClipConfig()
        self.train, self.seed, self.max_skips = train, seed, max_skips
        self.class_names = list(class_names) if class_names is not None else None
        self.epoch = 0
        if strict:
            for path, _ in self.samples:
                probe(path)
                read_frames(path, [0])

    @classmethod
    def from_list(cls, list_file: str, root: str | None = None, **kwargs) -> "VideoDataset":
        """The official list format: `<path> <label>` per line, paths relative to `root`."""
        return cls(_read_list(list_file, root), **kwargs)

    @classmethod
    def from_csv(cls, csv_file: str, root: str | None = None, **kwargs) -> "VideoDataset":
        samples, names = _read_csv(csv_file, root)
        return cls(samples, class_names=kwargs.pop("class_names", names), **kwargs)

    @classmethod
    def from_folder(cls, root: str, **kwargs) -> "VideoDataset":
        samples, names = _read_folder(root)
        return cls(samples, class_names=kwargs.pop("class_names", names), **kwargs)

    @classmethod
    def from_path(cls, path: str, root: str | None = None, **kwargs) -> "VideoDataset":
        """A folder tree if `path` is a directory, a CSV if it ends in .csv, else a list file."""
        if os.path.isdir(path):
            return cls.from_folder(path, **kwargs)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such data file or folder: {path!r}")
        if path.lower().endswith(".csv"):
            return cls.from_csv(path, root, **kwargs)
        return cls.from_list(path, root, **kwargs)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else max(label for _, label in self.samples) + 1

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def set_epoch(self, epoch: int) -> None:
        """Training clips of epoch e differ from those of other epochs and repeat exactly when
        epoch e is run again (resume). Set before the epoch's DataLoader iterator is made."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> torch.Tensor:
        """The clip(s) of sample `index`; raises `VideoDecodeError`."""
        path, _ = self.samples[index]
        info = probe(path)
        c = self.clip
        if self.train:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            frames = sample_indices(c.sampling, info.num_frames, c.num_frames, c.sampling_rate, rng)
            geometry = train_geometry(info.width, info.height, c.crop_size, c.train_scale, c.flip, rng)
            decoded = read_frames(path, frames, size=(geometry.width, geometry.height))
            return apply_geometry(decoded, geometry)
        geometries = view_geometries(info.width, info.height, c.crop_size, c.test_scale or c.crop_size,
                                     c.num_spatial_views)
        views = [sample_indices(c.sampling, info.num_frames, c.num_frames, c.sampling_rate, None,
                                view, c.num_temporal_views) for view in range(c.num_temporal_views)]
        # One decode for all temporal views (they overlap for short videos).
        size = (geometries[0].width, geometries[0].height)
        decoded = read_frames(path, np.concatenate(views), size=size)
        clips = []
        for t in range(c.num_temporal_views):
            frames = decoded[t * c.num_frames:(t + 1) * c.num_frames]
            clips.extend(apply_geometry(frames, geometry) for geometry in geometries)
        return torch.stack(clips)

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for attempt in range(self.max_skips + 1):
            current = (index + attempt) % len(self.samples)
            try:
                clip = self.load(current)
            except VideoDecodeError as error:
                warnings.warn(f"skipping video: {error}", VideoSkippedWarning, stacklevel=2)
                skipped.append(error.path)
                continue
            return {"clip": clip, "label": self.samples[current][1], "index": current, "skipped": skipped}
        raise VideoDecodeError(self.samples[index][0],
                               f"it and the next {self.max_skips} videos all failed to decode")


def collate_clips(samples: list[dict]) -> dict:
    """Stack samples: "clips" uint8 (B, [V,] 3, T, H, W), "labels" and "indices" int64 (B,),
    "skipped" the list of every skipped path."""
    return {
        "clips": torch.stack([s["clip"] for s in samples]),
        "labels": torch.tensor([s["label"] for s in samples], dtype=torch.int64),
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
        "skipped": [path for s in samples for path in s["skipped"]],
    }


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python's and numpy's global generators from the
    worker's torch seed (which the loader derives from its generator), so any transform that
    uses them is reproducible too."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)

