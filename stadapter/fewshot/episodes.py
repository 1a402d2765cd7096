"""Few-shot splits and N-way K-shot episodes.

Split files follow the usual few-shot benchmark form (SSv2-Small, Kinetics-100, UCF101,
HMDB51): one video id per line, no label. An id is a path relative to the video root, with or
without its extension; its class is its parent folder (`abseiling/abc123.mp4`), or comes from
a `labels` mapping id -> class name for benchmarks whose ids are bare (SSv2: the labels JSON).
The train / val / test splits must be class-disjoint: that is what makes a test class new.

`EpisodeSampler` draws episodes of `way` classes with `shot` support and `queries` query
videos per class. Episode e depends only on (seed, e), so a run resumed at episode e sees the
episodes it would have seen.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from ..data import VIDEO_EXTENSIONS


@dataclass(frozen=True)
class Split:
    """The videos of one split: `paths[i]` has class `class_names[labels[i]]`."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]

    @classmethod
    def from_pairs(cls, pairs: Sequence[tuple[str, str]]) -> "Split":
        """(path, class name) pairs; labels index the sorted class names."""
        names = sorted({name for _, name in pairs})
        index = {name: i for i, name in enumerate(names)}
        return cls([path for path, _ in pairs], [index[name] for _, name in pairs], names)

    def samples(self) -> list[tuple[str, int]]:
        """(path, label) pairs, the form `stadapter.data.VideoDataset` takes."""
        return list(zip(self.paths, self.labels))


def _resolve(root: str, video_id: str) -> str:
    path = os.path.join(root, video_id)
    if os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS:
        return path
    for extension in VIDEO_EXTENSIONS:
        if os.path.isfile(path + extension):
            return path + extension
    return path


def read_split(split_file: str, root: str, labels: Mapping[str, str] | None = None) -> Split:
    """One video id per line -> `Split`; classes from `labels[id]` or else the id's parent folder."""
    pairs = []
    with open(split_file) as handle:
        for number, line in enumerate(handle, 1):
            video_id = line.strip()
            if not video_id or video_id.startswith("#"):
                continue
            if labels is not None:
                key = os.path.splitext(video_id)[0]
                name = labels.get(video_id, labels.get(key))
                if name is None:
                    raise ValueError(f"{split_file}:{number}: video id {video_id!r} is not in labels")
            else:
                name = os.path.dirname(video_id.rstrip("/"))
                if not name:
                    raise ValueError(f"{split_file}:{number}: video id {video_id!r} has no class folder; "
                                     "pass labels (id -> class name) for bare ids")
            pairs.append((_resolve(root, video_id), name))
    if not pairs:
        raise ValueError(f"{split_file}: no video ids")
    return Split.from_pairs(pairs)


def check_disjoint(splits: Mapping[str, Split]) -> None:
    """Raise if any class appears in two splits (few-shot test classes must be unseen)."""
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            shared = set(splits[first].class_names) & set(splits[second].class_names)
            if shared:
                raise ValueError(f"splits {first!r} and {second!r} share classes {sorted(shared)[:5]}: "
                                 "few-shot splits must be class-disjoint")


def read_splits(files: Mapping[str, str], root: str, labels: Mapping[str, str] | None = None) -> dict[str, Split]:
    """{"train": file, "val": file, "test": file} -> class-disjoint `Split`s."""
    splits = {name: read_split(path, root, labels) for name, path in files.items()}
    check_disjoint(splits)
    return splits


@dataclass(frozen=True)
class Episode:
    """One N-way K-shot episode, as indices into the split's videos.

    `classes[n]` is the split label of episode class n; `support` holds `shot` videos of each
    class in class order (class-major), `query` holds `queries` videos of each class likewise;
    `query_targets[i]` is the episode class (0..way-1) of `query[i]`.
    """

    classes: list[int]
    support: list[int]
    query: list[int]
    query_targets: list[int]


class EpisodeSampler:
    """Seeded N-way K-shot episodes over videos with `labels` (one label per video).

    Each episode picks `way` classes that have at least `shot + queries` videos, then `shot`
    support and `queries` query videos per class, all distinct.
    """

    def __init__(self, labels: Sequence[int], way: int, shot: int, queries: int, episodes: int, seed: int = 0):
        for name, value in (("way", way), ("shot", shot), ("queries", queries), ("episodes", episodes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.way, self.shot, self.queries, self.episodes, self.seed = way, shot, queries, episodes, seed
        by_class: dict[int, list[int]] = {}
        for index, label in enumerate(labels):
            by_class.setdefault(int(label), []).append(index)
        self.by_class = {label: np.array(videos) for label, videos in sorted(by_class.items())
                         if len(videos) >= shot + queries}
        if len(self.by_class) < way:
            raise ValueError(f"way={way} needs {way} classes with at least shot + queries = {shot + queries} "
                             f"videos each; only {len(self.by_class)} have that many")
        self.eligible = np.array(list(self.by_class))

    def __len__(self) -> int:
        return self.episodes

    def episode(self, number: int) -> Episode:
        """Episode `number`, a function of (seed, number) only."""
        rng = np.random.default_rng([self.seed, number])
        classes = rng.choice(self.eligible, size=self.way, replace=False)
        support, query = [], []
        for label in classes:
            videos = rng.choice(self.by_class[int(label)], size=self.shot + self.queries, replace=False)
            support.extend(int(v) for v in videos[: self.shot])
            query.extend(int(v) for v in videos[self.shot:])
        targets = [n for n in range(self.way) for _ in range(self.queries)]
        return Episode([int(c) for c in classes], support, query, targets)

    def __iter__(self):
        return (self.episode(number) for number in range(self.episodes))
