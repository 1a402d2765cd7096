"""Which frames of a video make a clip.

Two schemes, as in the official ST-Adapter code:
- "uniform" (TSN; the default for Something-Something): the video is cut into `num_frames`
  equal segments and one frame is taken from each, at a random position in training and at a
  fixed position per temporal view at test time;
- "dense" (Kinetics): `num_frames` frames `sampling_rate` apart from a random start in
  training, or from starts spread evenly over the video at test time, one per temporal view.

Training randomness comes from a `numpy.random.Generator` the caller seeds, so a clip depends
only on (seed, epoch, sample index), not on worker count or order.
"""

from __future__ import annotations

import numpy as np

SAMPLINGS = ("uniform", "dense")


def _check(video_frames: int, num_frames: int, view: int, num_views: int) -> None:
    if video_frames < 1:
        raise ValueError(f"video_frames must be >= 1, got {video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_views < 1 or not 0 <= view < num_views:
        raise ValueError(f"view must be in [0, num_views), got view={view}, num_views={num_views}")


def uniform_indices(video_frames: int, num_frames: int, rng: np.random.Generator | None = None,
                    view: int = 0, num_views: int = 1) -> np.ndarray:
    """One frame per segment: a random one (rng given) or the one at fraction (view + 0.5) /
    num_views of each segment. A video shorter than `num_frames` repeats frames."""
    _check(video_frames, num_frames, view, num_views)
    segment = video_frames / num_frames
    if rng is not None:
        offsets = rng.uniform(0.0, segment, size=num_frames)
    else:
        offsets = np.full(num_frames, segment * (view + 0.5) / num_views)
    indices = np.floor(np.arange(num_frames) * segment + offsets).astype(np.int64)
    return np.minimum(indices, video_frames - 1)


def dense_indices(video_frames: int, num_frames: int, sampling_rate: int, rng: np.random.Generator | None = None,
                  view: int = 0, num_views: int = 1) -> np.ndarray:
    """`num_frames` frames `sampling_rate` apart. The start is random (rng given), else the
    view-th of `num_views` starts spread evenly from the first to the last possible one (the
    middle one for a single view). Frames past the end repeat the last frame."""
    _check(video_frames, num_frames, view, num_views)
    if sampling_rate < 1:
        raise ValueError(f"sampling_rate must be >= 1, got {sampling_rate}")
    last_start = max(video_frames - ((num_frames - 1) * sampling_rate + 1), 0)
    if rng is not None:
        start = int(rng.integers(0, last_start + 1))
    elif num_views == 1:
        start = last_start // 2
    else:
        start = int(round(last_start * view / (num_views - 1)))
    indices = start + np.arange(num_frames, dtype=np.int64) * sampling_rate
    return np.minimum(indices, video_frames - 1)


def sample_indices(sampling: str, video_frames: int, num_frames: int, sampling_rate: int = 1,
                   rng: np.random.Generator | None = None, view: int = 0, num_views: int = 1) -> np.ndarray:
    """`uniform_indices` or `dense_indices` by name (`sampling_rate` is used by "dense" only)."""
    if sampling == "uniform":
        return uniform_indices(video_frames, num_frames, rng, view, num_views)
    if sampling == "dense":
        return dense_indices(video_frames, num_frames, sampling_rate, rng, view, num_views)
    raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
