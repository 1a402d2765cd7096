"""`TrainConfig`: every setting of `stadapter train`, one table for flags, YAML and checkpoints.

Each field's metadata holds its help text; `add_arguments` turns the fields into flags
(`--crop-size`, booleans as `--flip/--no-flip`), `load_yaml` reads the same keys from a file
(dashes or underscores), and a checkpoint stores `to_dict()` so `stadapter eval` can rebuild
the model. Precedence: defaults < `--config` file < flags given on the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields

from stadapter.data import ClipConfig

AMP_DTYPES = ("none", "bfloat16", "float16")


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting (and the file, for YAML)."""


def _f(default, help: str, **kwargs):
    if isinstance(default, (list, dict)):  # mutable defaults need a factory
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    # ---- data ----
    train_data: str | None = _f(None, "training videos: a list file ('<path> <label>' per line), a CSV "
                                      "(path,label) or a folder with one subfolder per class")
    val_data: str | None = _f(None, "evaluation videos, same formats (evaluated every --eval-every epochs)")
    data_root: str | None = _f(None, "folder the paths in list and CSV files are relative to")
    num_classes: int | None = _f(None, "number of classes (default: from the training data)")
    num_frames: int = _f(8, "frames per clip")
    sampling: str = _f("uniform", "frame sampling: uniform (TSN segments) or dense (--sampling-rate apart)")
    sampling_rate: int = _f(8, "frame step of dense sampling")
    crop_size: int = _f(224, "side of the square crop (the backbone's input size)")
    train_scale: tuple[int, int] = _f((256, 320), "range of the random short side in training (2 ints)")
    test_scale: int | None = _f(None, "short side at test time (default: --crop-size)")
    flip: bool = _f(True, "random horizontal flip in training (off for direction-sensitive classes)")
    num_temporal_views: int = _f(1, "temporal views per video at test time")
    num_spatial_views: int = _f(1, "spatial crops per video at test time")
    strict: bool = _f(False, "check every video decodes at start-up and stop on the first that does not "
                             "(default: skip undecodable videos with a warning and count them)")
    num_workers: int = _f(2, "data loading processes per training process")
    # ---- model ----
    backbone: str = _f("vit_base_patch16_clip_224", "timm model name (random weights unless "
                       "--backbone-weights), or open_clip:NAME")
    backbone_kwargs: dict = _f({}, "JSON object of extra keyword arguments for the timm model, e.g. '{\"img_size\": 32}'")
    backbone_weights: str | None = _f(None, "backbone weights (safetensors or torch.save state dict); with "
                                            "--official-checkpoint, OpenAI CLIP's weights")
    official_checkpoint: str | None = _f(None, "start from an official ST-Adapter checkpoint")
    adapters: bool = _f(True, "ST-Adapters in the backbone (--no-adapters: a linear probe on the frozen "
                              "backbone's temporal mean)")
    positions: tuple[str, ...] = _f(("pre_mlp",), "adapter positions: pre_attn and/or pre_mlp")
    layers: str = _f("all", "blocks with adapters: all, N (the last N) or indices like 0,2,4")
    bottleneck: int = _f(384, "adapter bottleneck width Ca")
    kernel_t: int = _f(3, "adapter temporal kernel size")
    activation: str = _f("identity", "adapter activation")
    dropout: float = _f(0.5, "dropout before the head")
    # ---- optimisation ----
    epochs: int = _f(10, "training epochs")
    batch_size: int = _f(8, "clips per process per micro-batch")
    accum_steps: int = _f(1, "micro-batches per optimizer step (gradient accumulation)")
    blr: float = _f(1e-3, "learning rate per 256 clips, scaled by the global batch")
    lr: float | None = _f(None, "absolute learning rate (overrides --blr)")
    min_lr: float = _f(0.0, "learning rate at the end of the cosine")
    warmup_epochs: float = _f(1.0, "epochs of linear warm-up")
    weight_decay: float = _f(0.05, "AdamW weight decay (none on biases, norms, 1-D tensors)")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value")
    amp: str = _f("none", "mixed precision: none, bfloat16, or float16 (CUDA, with a gradient scaler)")
    compile: bool = _f(False, "torch.compile the model")
    device: str = _f("auto", "auto (CUDA if available), cpu or cuda")
    threads: int | None = _f(None, "torch threads per process (default: torch's choice)")
    # ---- run ----
    output_dir: str = _f("runs/train", "folder for checkpoints, metrics.jsonl and the final adapters")
    eval_every: int = _f(1, "evaluate every N epochs (0: only at the end)")
    save_every: int = _f(1, "checkpoint every N epochs (and at the end)")
    keep_checkpoints: int = _f(2, "checkpoints to keep (the newest)")
    resume: str | None = _f(None, "resume from this checkpoint (a folder under output_dir/checkpoints)")
    auto_resume: bool = _f(True, "resume from the newest valid checkpoint in --output-dir")
    max_steps: int | None = _f(None, "stop after this many optimizer steps in total (a checkpoint is written)")
    seed: int = _f(0, "seed of data order, augmentation, dropout and the head")
    log_every: int = _f(10, "write a metrics line every N optimizer steps")
    progress: bool = _f(True, "progress bar on rank 0")

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the first setting that cannot work (file paths excluded:
        `check_paths` does those, so a config can be made before its data exists)."""
        self.train_scale = tuple(int(v) for v in self.train_scale)
        self.positions = (self.positions,) if isinstance(self.positions, str) else tuple(self.positions)
        self.layers = str(self.layers)
        for name in ("num_frames", "batch_size", "accum_steps", "epochs", "bottleneck", "kernel_t", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name in ("num_workers", "eval_every", "save_every", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.keep_checkpoints < 1:
            raise ConfigError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be one of {AMP_DTYPES}, got {self.amp!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not isinstance(self.backbone_kwargs, dict):
            raise ConfigError(f"backbone_kwargs must be a JSON object, got {self.backbone_kwargs!r}")
        try:
            self.clip_config()
        except ValueError as error:
            raise ConfigError(str(error)) from error

    def check_paths(self, train: bool = True) -> None:
        """Raise `ConfigError` for a data or weights file that does not exist."""
        if train and self.train_data is None:
            raise ConfigError("train_data is required (--train-data PATH)")
        names = ("train_data", "val_data", "backbone_weights", "official_checkpoint", "resume") if train else \
            ("val_data", "backbone_weights", "official_checkpoint")
        for name in names:
            path = getattr(self, name)
            if path is not None and not os.path.exists(path):
                raise ConfigError(f"{name}: no such file or folder: {path!r}")

    def clip_config(self) -> ClipConfig:
        return ClipConfig(**{f.name: getattr(self, f.name) for f in fields(ClipConfig)})

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "TrainConfig":
        """From a dict with field names (dashes allowed); unknown keys raise `ConfigError`."""
        known = {f.name for f in fields(cls)}
        values = {}
        for key, value in data.items():
            name = str(key).replace("-", "_")
            if name not in known:
                raise ConfigError(f"{source}: unknown key {key!r}")
            values[name] = value
        return cls(**values)


def load_yaml(path: str) -> dict:
    """The settings of a YAML file as a dict of field names; `ConfigError` naming the file."""
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path!r}: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"--config {path}: not valid YAML: {error}") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(TrainConfig)}
    for key in data:
        if str(key).replace("-", "_") not in known:
            raise ConfigError(f"--config {path}: unknown key {key!r}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _base_type(annotation):
    """int for `int | None`, and so on; the field annotations are strings here (future import)."""
    hint = eval(annotation, {"tuple": tuple, "dict": dict, "str": str, "int": int, "float": float,
                             "bool": bool}) if isinstance(annotation, str) else annotation
    if isinstance(hint, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def add_arguments(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of `TrainConfig` (except `skip`); unset flags stay absent from the
    parsed namespace (argparse.SUPPRESS), so a `--config` file can fill them."""
    for f in fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(f.type)
        default = f.default if f.default is not MISSING else f.default_factory()
        help_text = f"{f.metadata['help']} (default: {default!r})"
        common = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(kind) or kind
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif origin is tuple:
            item = typing.get_args(kind)[0]
            nargs = len(typing.get_args(kind)) if Ellipsis not in typing.get_args(kind) else "+"
            parser.add_argument(flag, type=item, nargs=nargs, metavar=f.name.upper(), **common)
        elif origin is dict:
            parser.add_argument(flag, type=_json_object, metavar="JSON", **common)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **common)


def config_from_args(args: argparse.Namespace, skip: tuple[str, ...] = ("config",)) -> TrainConfig:
    """Defaults, then the `--config` file (if any), then the flags that were given."""
    values = load_yaml(args.config) if getattr(args, "config", None) else {}
    values.update({k: v for k, v in vars(args).items() if k not in skip and k in TrainConfig.__dataclass_fields__})
    source = f"--config {args.config}" if getattr(args, "config", None) else "flags"
    try:
        return TrainConfig(**values)
    except TypeError as error:  # a YAML value of the wrong kind (e.g. a list for an int)
        raise ConfigError(f"{source}: {error}") from error
