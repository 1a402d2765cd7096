"""Training and evaluation of video models on a frozen ViT (`stadapter train` / `stadapter eval`).

    from stadapter.train import TrainConfig, train
    summary = train(TrainConfig(train_data="videos/train", val_data="videos/val", epochs=5))

See `TrainConfig` for every setting; `stadapter train --help` lists them as flags.
"""

from .checkpoints import (CheckpointError, CheckpointSkippedWarning, latest_valid_checkpoint, list_checkpoints,
                          load_checkpoint, save_checkpoint, verify_checkpoint)
from .config import ConfigError, TrainConfig
from .evaluate import evaluate
from .params import param_groups
from .schedule import WarmupCosine, scaled_lr
from .trainer import build_model, train

__all__ = ["CheckpointError", "CheckpointSkippedWarning", "ConfigError", "TrainConfig", "WarmupCosine", "build_model",
           "evaluate", "latest_valid_checkpoint", "list_checkpoints", "load_checkpoint", "param_groups",
           "save_checkpoint", "scaled_lr", "train", "verify_checkpoint"]
