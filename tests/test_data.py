"""stadapter.data over real mp4 files written here with PyAV.

Each test video carries its frame index as a 3 x 3 grid of black/white blocks (9 bits), which
survives lossy coding, so a test can read back which frames a clip holds.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch


from stadapter.data import (ClipConfig, VideoDataset, VideoDecodeError, VideoSkippedWarning, collate_clips,
                            dense_indices, normalize_clips, probe, read_frames, sample_indices, view_geometries,
                            train_geometry, uniform_indices, write_video)

SIDE = 48
BLOCK = SIDE // 3


def coded_frames(count: int) -> np.ndarray:
    frames = np.zeros((count, SIDE, SIDE, 3), np.uint8)
    for index in range(count):
        for bit in range(9):
            if (index >> bit) & 1:
                row, col = divmod(bit, 3)
                frames[index, row * BLOCK:(row + 1) * BLOCK, col * BLOCK:(col + 1) * BLOCK] = 255
    return frames


def read_code(frame: np.ndarray) -> int:
    """Frame index from an (H, W, 3) or (3, H, W) frame of `coded_frames`."""
    if frame.shape[0] == 3:
        frame = frame.transpose(1, 2, 0)
    value = 0
    for bit in range(9):
        row, col = divmod(bit, 3)
        centre = frame[row * BLOCK + 4:(row + 1) * BLOCK - 4, col * BLOCK + 4:(col + 1) * BLOCK - 4]
        value |= int(centre.mean() > 128) << bit
    return value


def clip_codes(clip: torch.Tensor) -> list[int]:
    """Frame indices of a (3, T, H, W) uint8 clip."""
    return [read_code(clip[:, t].numpy()) for t in range(clip.shape[1])]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Two classes in a folder tree: 40- and 64-frame videos, keyframe every 8 frames."""
    root = tmp_path_factory.mktemp("videos")
    lengths = {"jump": [40, 64], "walk": [64, 40, 64]}
    for name, counts in lengths.items():
        os.makedirs(root / name)
        for i, count in enumerate(counts):
            write_video(str(root / name / f"{i}.mp4"), coded_frames(count), gop=8)
    return root


def test_read_frames_returns_the_asked_frames_in_order_and_seeks_past_gaps(tmp_path):
    path = str(tmp_path / "long.mp4")
    write_video(path, coded_frames(400), gop=10)
    assert probe(path).num_frames == 400
    stats = {}
    wanted = [5, 200, 201, 390, 3]
    frames = read_frames(path, wanted, stats=stats)
    assert [read_code(f) for f in frames] == wanted
    # Three seeks (to 3, 200, 390), each decoding at most a keyframe interval before its target.
    assert stats["decoded"] <= 3 * 10 + len(wanted)
    every_seventh = list(range(0, 400, 7))
    assert [read_code(f) for f in read_frames(path, every_seventh)] == every_seventh
    # Past the end: the last frame (a container's count can overstate).
    assert [read_code(f) for f in read_frames(path, [399, 450])] == [399, 399]
    with pytest.raises(ValueError, match="non-negative"):
        read_frames(path, [-1])


def test_read_frames_resizes_in_the_converter(tmp_path):
    path = str(tmp_path / "v.mp4")
    write_video(path, coded_frames(4))
    frames = read_frames(path, [1, 2], size=(24, 32))
    assert frames.shape == (2, 32, 24, 3) and frames.dtype == np.uint8


def test_uniform_and_dense_indices():
    # 32 frames, 8 segments of 4: test view at the segment centres.
    assert uniform_indices(32, 8).tolist() == [2, 6, 10, 14, 18, 22, 26, 30]
    assert uniform_indices(32, 8, view=0, num_views=2).tolist() == [1, 5, 9, 13, 17, 21, 25, 29]
    assert uniform_indices(32, 8, view=1, num_views=2).tolist() == [3, 7, 11, 15, 19, 23, 27, 31]
    rng = np.random.default_rng(0)
    for _ in range(20):
        indices = uniform_indices(32, 8, rng)
        assert all(4 * k <= i < 4 * (k + 1) for k, i in enumerate(indices))
    assert uniform_indices(3, 6).tolist() == [0, 0, 1, 1, 2, 2]  # short video repeats frames
    # Dense: span (4 - 1) * 2 + 1 = 7 over 20 frames, starts 0..13.
    assert dense_indices(20, 4, 2).tolist() == [6, 8, 10, 12]
    assert [dense_indices(20, 4, 2, view=v, num_views=3)[0] for v in range(3)] == [0, 6, 13]
    starts = {int(dense_indices(20, 4, 2, np.random.default_rng(s))[0]) for s in range(200)}
    assert starts == set(range(14))
    assert dense_indices(5, 4, 2).tolist() == [0, 2, 4, 4]  # past the end: the last frame
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_indices("random", 10, 4)
    with pytest.raises(ValueError, match="view"):
        uniform_indices(10, 4, view=2, num_views=2)


def test_train_and_view_geometries():
    rng = np.random.default_rng(0)
    for _ in range(20):
        g = train_geometry(320, 240, 224, (256, 320), True, rng)
        assert 256 <= g.height <= 320 and g.width == round(320 * g.height / 240)
        assert 0 <= g.left <= g.width - 224 and 0 <= g.top <= g.height - 224
    assert {train_geometry(64, 64, 32, (32, 32), True, np.random.default_rng(s)).flip for s in range(20)} == {True, False}
    assert not any(train_geometry(64, 64, 32, (32, 32), False, np.random.default_rng(s)).flip for s in range(20))
    # Three test crops along the long side: left, centre, right.
    views = view_geometries(400, 200, 224, 224, 3)
    assert [(g.width, g.height) for g in views] == [(448, 224)] * 3
    assert [g.left for g in views] == [0, 112, 224] and {g.top for g in views} == {0}
    assert [g.top for g in view_geometries(200, 400, 224, 224, 3)] == [0, 112, 224]


def test_normalize_clips():
    clips = torch.full((2, 3, 1, 1, 1), 255, dtype=torch.uint8)
    out = normalize_clips(clips, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert out.dtype == torch.float32 and out[0, :, 0, 0, 0].tolist() == pytest.approx([2.0, 1.0, 0.5])
    with pytest.raises(TypeError, match="uint8"):
        normalize_clips(clips.float())


def clip_config(**overrides) -> ClipConfig:
    # No resize and a full-frame crop, so the frame codes read back unchanged.
    settings = dict(num_frames=4, crop_size=SIDE, train_scale=(SIDE, SIDE), flip=False)
    return ClipConfig(**{**settings, **overrides})


def test_folder_dataset_train_clips_hold_the_sampled_frames(videos):
    data = VideoDataset.from_folder(str(videos), clip=clip_config(sampling="dense", sampling_rate=3), seed=7)
    assert data.class_names == ["jump", "walk"] and data.labels == [0, 0, 1, 1, 1] and data.num_classes == 2
    data.set_epoch(2)
    for index in range(len(data)):
        item = data[index]
        assert item["clip"].shape == (3, 4, SIDE, SIDE) and item["clip"].dtype == torch.uint8
        assert item["label"] == data.labels[index] and item["index"] == index and item["skipped"] == []
        count = probe(data.samples[index][0]).num_frames
        expected = sample_indices("dense", count, 4, 3, np.random.default_rng([7, 2, index]))
        assert clip_codes(item["clip"]) == expected.tolist()
    # Reproducible per (seed, epoch, index); another epoch gives other clips.
    assert torch.equal(data[1]["clip"], data[1]["clip"])
    again = [clip_codes(data[i]["clip"]) for i in range(len(data))]
    data.set_epoch(3)
    assert [clip_codes(data[i]["clip"]) for i in range(len(data))] != again


def test_list_and_csv_datasets_test_views(videos, tmp_path):
    list_file = tmp_path / "val.txt"
    list_file.write_text("# path label\njump/1.mp4 0\n\nwalk/0.mp4 1\n")
    clip = clip_config(num_temporal_views=2, num_spatial_views=3)
    data = VideoDataset.from_path(str(list_file), root=str(videos), clip=clip, train=False)
    assert data.labels == [0, 1] and data.class_names is None and data.num_classes == 2
    item = data[0]
    assert item["clip"].shape == (6, 3, 4, SIDE, SIDE)  # 2 temporal x 3 spatial views
    # Temporal views at 1/4 and 3/4 of each 16-frame segment of the 64-frame video; the
    # spatial crops of a square frame coincide.
    for view in range(6):
        assert clip_codes(item["clip"][view]) == uniform_indices(64, 4, view=view // 3, num_views=2).tolist()
    csv_file = tmp_path / "val.csv"
    csv_file.write_text("path,label\njump/0.mp4,jump\nwalk/2.mp4,walk\nwalk/1.mp4,walk\n")
    from_csv = VideoDataset.from_path(str(csv_file), root=str(videos), clip=clip_config(), train=False)
    assert from_csv.class_names == ["jump", "walk"] and from_csv.labels == [0, 1, 1]
    batch = collate_clips([from_csv[i] for i in range(3)])
    assert batch["clips"].shape == (3, 1, 3, 4, SIDE, SIDE) and batch["labels"].tolist() == [0, 1, 1]


def test_bad_sources_are_named(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("a.mp4 0\nb.mp4 x\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        VideoDataset.from_list(str(bad))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        VideoDataset.from_path(str(tmp_path / "missing.txt"))
    (tmp_path / "nocols.csv").write_text("file,class\na.mp4,0\n")
    with pytest.raises(ValueError, match="'path' and 'label'"):
        VideoDataset.from_csv(str(tmp_path / "nocols.csv"))
    with pytest.raises(ValueError, match="train_scale"):
        ClipConfig(crop_size=224, train_scale=(200, 300))


def test_corrupt_video_is_skipped_and_counted_and_strict_refuses_it(videos, tmp_path):
    good = str(videos / "walk" / "0.mp4")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video" * 100)
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(open(good, "rb").read()[:300])
    samples = [(str(garbage), 0), (str(truncated), 1), (good, 1)]
    data = VideoDataset(samples, clip=clip_config())
    with pytest.warns(VideoSkippedWarning) as caught:
        item = data[0]
    assert ["garbage.mp4" in str(w.message) for w in caught] == [True, False]
    assert item["index"] == 2 and item["label"] == 1 and item["skipped"] == [str(garbage), str(truncated)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoSkippedWarning)
        batch = collate_clips([data[0], data[2]])
    assert batch["skipped"] == [str(garbage), str(truncated)] and batch["indices"].tolist() == [2, 2]
    with pytest.raises(VideoDecodeError, match="garbage.mp4"):
        VideoDataset(samples, clip=clip_config(), strict=True)
    with pytest.raises(VideoDecodeError, match="truncated.mp4"):
        VideoDataset(samples[1:], clip=clip_config(), strict=True)
    VideoDataset(samples[2:], clip=clip_config(), strict=True)  # a good file passes
    with pytest.raises(VideoDecodeError, match="all failed"), warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoSkippedWarning)
        VideoDataset(samples[:2], clip=clip_config(), max_skips=1)[0]
