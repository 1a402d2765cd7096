"""Training checkpoints: the adapter file plus everything needed to continue the same run.

A checkpoint is a folder `output_dir/checkpoints/step-NNNNNNNN/` holding
- `adapters.safetensors`: the trainable tensors and adapter config (`stadapter.save_adapters`
  format, so `stadapter.load_adapters` reads it on its own);
- `train_state.pt`: optimizer, scheduler, gradient scaler, every RNG state, step and epoch
  (tensors and plain containers only, read back with `torch.load(weights_only=True)`);
- `config.json`: the `TrainConfig`, so `stadapter eval` can rebuild the model;
- `manifest.json`, written last: size and SHA-256 of each file.
The folder is built under a temporary name in the same directory, every file fsynced, then
renamed into place, so a crash leaves either the whole new checkpoint or none of it; a file
damaged later (truncated copy, full disk) fails the manifest check.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from stadapter import load_adapters, save_adapters

ADAPTERS, STATE, CONFIG, MANIFEST = "adapters.safetensors", "train_state.pt", "config.json", "manifest.json"
_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be resumed from; the message names the folder and the problem."""


class CheckpointSkippedWarning(UserWarning):
    """Auto-resume passed over a damaged checkpoint."""


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain values (safe for weights_only loads)."""
    version, mt_state, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": [version, list(mt_state), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | os.PathLike, model, train_state: dict, config: dict, keep: int = 2) -> Path:
    """Write checkpoint `step-<train_state["step"]>` atomically and keep only the newest `keep`.

    `model` is the unwrapped model (no DDP / compile wrapper). Returns the checkpoint folder.
    """
    parent = checkpoint_dir(output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / f"step-{int(train_state['step']):08d}"
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}."))
    try:
        save_adapters(model, tmp / ADAPTERS, extra_metadata={"step": str(train_state["step"])})
        torch.save(train_state, tmp / STATE)
        (tmp / CONFIG).write_text(json.dumps(config, indent=1))
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
                 for name in (ADAPTERS, STATE, CONFIG)}
        (tmp / MANIFEST).write_text(json.dumps({"step": int(train_state["step"]), "files": files}, indent=1))
        for name in (STATE, CONFIG, MANIFEST):
            _fsync(tmp / name)
        _fsync(tmp)
        if final.exists():  # the same step saved again (a resumed run re-reaching it): swap
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{final.name}.old."))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        _fsync(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for stale in list_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders in `output_dir`, oldest first (temporary folders excluded)."""
    parent = checkpoint_dir(output_dir)
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """The manifest of checkpoint `path` after checking every file's size and hash;
    `CheckpointError` saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path}: missing or unreadable {MANIFEST} (incomplete checkpoint?): {error}") from error
    for name in (ADAPTERS, STATE, CONFIG):
        file = path / name
        if name not in files or not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != files[name]["size"]:
            raise CheckpointError(f"{path}: {name} is {size} bytes, the manifest says {files[name]['size']} "
                                  "(truncated?)")
        if _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"{path}: {name} does not match its SHA-256 in the manifest (damaged)")
    return manifest


def latest_valid_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint that passes `verify_checkpoint`; damaged ones are passed over with a
    `CheckpointSkippedWarning`."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as error:
            warnings.warn(f"auto-resume skips a damaged checkpoint: {error}", CheckpointSkippedWarning, stacklevel=2)
    return None


def read_config(path: str | os.PathLike) -> dict:
    """The training config stored in checkpoint `path` (verified first)."""
    verify_checkpoint(path)
    return json.loads((Path(path) / CONFIG).read_text())


def load_checkpoint(path: str | os.PathLike, model) -> dict:
    """Load checkpoint `path` into `model` (unwrapped) and return its training state
    (optimizer, scheduler, scaler, rng, step, epoch). `CheckpointError` if it is damaged or
    does not fit the model; the model is then unchanged."""
    from stadapter import AdapterFileError

    path = Path(path)
    verify_checkpoint(path)
    try:
        state = torch.load(path / STATE, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types
        raise CheckpointError(f"{path / STATE}: cannot read the training state: {error}") from error
    try:
        load_adapters(model, path / ADAPTERS)
    except AdapterFileError as error:
        raise CheckpointError(f"{path}: the adapters do not fit this model: {error}") from error
    return state
