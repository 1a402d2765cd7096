"""Video data for training and evaluation: PyAV decoding, frame sampling, uint8 transforms.

    from stadapter.data import ClipConfig, VideoDataset, collate_clips, normalize_clips

    data = VideoDataset.from_path("train.txt", root="videos/", clip=ClipConfig(num_frames=8))
    batch = collate_clips([data[0], data[1]])        # uint8 (2, 3, 8, 224, 224)
    x = normalize_clips(batch["clips"])              # float, CLIP mean / std
"""

from .dataset import (VIDEO_EXTENSIONS, ClipConfig, VideoDataset, VideoSkippedWarning, collate_clips,
                      seed_worker)
from .decode import VideoDecodeError, VideoInfo, probe, read_frames, write_video
from .sampling import SAMPLINGS, dense_indices, sample_indices, uniform_indices
from .transforms import (CLIP_MEAN, CLIP_STD, Geometry, apply_geometry, normalize_clips, view_geometries,
                         train_geometry)

__all__ = [
    "CLIP_MEAN", "CLIP_STD", "SAMPLINGS", "VIDEO_EXTENSIONS", "ClipConfig", "Geometry", "VideoDataset",
    "VideoDecodeError", "VideoInfo", "VideoSkippedWarning", "apply_geometry", "collate_clips", "dense_indices",
    "normalize_clips", "probe", "read_frames", "sample_indices", "seed_worker", "view_geometries",
    "train_geometry", "uniform_indices", "write_video",
]
