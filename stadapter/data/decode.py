"""Video files through PyAV: read only the frames a clip needs, and write mp4 files.

`read_frames` seeks to the keyframe before the first wanted frame and decodes forward, seeking
again only when the next wanted frame is far ahead (a TSN clip over a long video touches a few
frames per segment); decoding through a short gap is cheaper than a seek back to its keyframe.
Frames are identified by their presentation time, so a container that starts at a non-zero
timestamp or drops a frame still maps to the right indices.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

# Decoding through up to this many unwanted frames is preferred over a seek (which lands on the
# previous keyframe, typically 12-250 frames back with x264 defaults).
SEEK_GAP = 24


class VideoDecodeError(RuntimeError):
    """A video file that cannot be opened or decoded; the message names the file."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot decode video {path!r}: {reason}")
        self.path, self.reason = path, reason


def _av():
    try:
        import av
    except ImportError as error:  # the data path needs PyAV; say how to get it
        raise ImportError("stadapter.data needs PyAV: pip install av") from error
    return av


@dataclass(frozen=True)
class VideoInfo:
    """What sampling needs to know about a file before decoding it."""

    num_frames: int
    width: int
    height: int
    fps: float


def _frame_rate(stream) -> Fraction:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise ValueError("the video stream has no frame rate")
    return Fraction(rate)


def _count_frames(container, stream, rate: Fraction) -> int:
    if stream.frames:
        return int(stream.frames)
    if stream.duration:  # containers without a frame count (e.g. webm) still give a duration
        return max(1, int(round(stream.duration * stream.time_base * rate)))
    count = sum(1 for _ in container.decode(stream))
    container.seek(0)
    return count


def probe(path: str) -> VideoInfo:
    """Frame count, size and rate of the first video stream of `path` (decodes nothing if the
    container stores a frame count or a duration). Raises `VideoDecodeError`."""
    av = _av()
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = _frame_rate(stream)
            count = _count_frames(container, stream, rate)
            width, height = stream.codec_context.width, stream.codec_context.height
    except (av.FFmpegError, ValueError, OSError) as error:
        raise VideoDecodeError(os.fspath(path), str(error)) from error
    if count < 1 or width < 1 or height < 1:
        raise VideoDecodeError(os.fspath(path), f"empty video ({count} frames, {width}x{height})")
    return VideoInfo(count, width, height, float(rate))


class _Decoder:
    """Forward decoding of one stream with seeks; `decoded` counts the frames decoded."""

    def __init__(self, container, stream):
        self.container, self.stream = container, stream
        self.rate = _frame_rate(stream)
        self.start = stream.start_time or 0
        self.frames = None
        self.decoded = 0

    def index_of(self, frame) -> int:
        return int(round((frame.pts - self.start) * self.stream.time_base * self.rate))

    def seek(self, index: int) -> None:
        pts = self.start + int(index / self.rate / self.stream.time_base)
        self.container.seek(pts, stream=self.stream, backward=True, any_frame=False)
        self.frames = self.container.decode(self.stream)

    def next(self):
        if self.frames is None:
            self.frames = self.container.decode(self.stream)
        frame = next(self.frames, None)
        if frame is not None:
            self.decoded += 1
        return frame


def read_frames(path: str, indices, size: tuple[int, int] | None = None, stats: dict | None = None) -> np.ndarray:
    """Frames `indices` of `path` as uint8 RGB, shape (len(indices), H, W, 3), in the given order.

    `size` = (width, height) resizes while converting (swscale, still uint8). An index past the
    last decodable frame gets the last frame (a container's frame count can overstate). `stats`,
    if given, receives "decoded": how many frames were decoded. Raises `VideoDecodeError`.
    """
    av = _av()
    wanted = sorted(set(int(i) for i in indices))
    if not wanted or wanted[0] < 0:
        raise ValueError(f"indices must be non-negative and non-empty, got {list(indices)!r}")
    width, height = size if size is not None else (None, None)
    found: dict[int, np.ndarray] = {}
    try:
        with av.open(os.fspath(path)) as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            decoder = _Decoder(container, container.streams.video[0])
            position = -1  # index of the last decoded frame
            last = None
            pending = 0  # wanted[pending] is the next frame to find
            sought = -1  # the target of the last seek: a keyframe far behind it must not loop
            while pending < len(wanted):
                if wanted[pending] - position > SEEK_GAP and sought != wanted[pending]:
                    decoder.seek(wanted[pending])
                    sought = wanted[pending]
                frame = decoder.next()
                if frame is None:
                    break
                position = decoder.index_of(frame)
                if position < wanted[pending]:
                    continue
                last = frame.to_ndarray(format="rgb24", width=width, height=height)
                while pending < len(wanted) and wanted[pending] <= position:
                    found[wanted[pending]] = last
                    pending += 1
            if last is None:
                raise ValueError("no frame could be decoded")
            for index in wanted[pending:]:
                found[index] = last
    except (av.FFmpegError, ValueError, OSError) as error:
        raise VideoDecodeError(os.fspath(path), str(error)) from error
    if stats is not None:
        stats["decoded"] = decoder.decoded
    return np.stack([found[int(i)] for i in indices])


def write_video(path: str, frames: np.ndarray, fps: int = 8, codec: str | None = None, gop: int = 12,
                quality: int = 12) -> None:
    """Write uint8 RGB `frames` (T, H, W, 3), H and W even, as a video file (mp4 by suffix).

    `codec` defaults to libx264 where this PyAV build has it, else mpeg4 (which is about five
    times faster to write tiny videos with); `gop` is the keyframe interval; `quality` the x264
    CRF (lower is better). The file appears only when
    complete.
    """
    av = _av()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frame height and width must be even for yuv420p, got {frames.shape[1:3]}")
    if codec is None:
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}{os.path.splitext(path)[1]}"
    with av.open(tmp, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.options = {"crf": str(quality), "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)
