"""The training loop of `stadapter train`: a frozen ViT, trainable ST-Adapters and head.

One function, `train(config)`, used by the command line, the demo and the tests. It runs as
one process or under `torchrun` (DDP; each process loads its share of every global batch).
A run is a deterministic function of its config: data order from (seed, epoch), augmentation
from (seed, epoch, sample), dropout from the saved RNG state, so resuming at step k gives the
same weights as never stopping.
"""

from __future__ import annotations

import contextlib
import json
import math
import resource
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from stadapter import save_adapters
from stadapter.data import VideoDataset, VideoSkippedWarning, collate_clips, normalize_clips, seed_worker
from stadapter.models import VideoViT

from .checkpoints import (CheckpointError, latest_valid_checkpoint, load_checkpoint, rng_state, save_checkpoint,
                          set_rng_state)
from .config import ConfigError, TrainConfig
from .distributed import Distributed, all_gather_objects, init_distributed, mean_over_ranks, shutdown
from .evaluate import autocast_context, evaluate
from .params import param_groups
from .schedule import WarmupCosine, scaled_lr


class ResumableSampler(DistributedSampler):
    """`DistributedSampler` that can start an epoch after its first `skip` samples (resume)."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool, seed: int, drop_last: bool):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def build_backbone(config: TrainConfig) -> nn.Module:
    """The image backbone named by the config, with its weights if given."""
    name = config.backbone
    if name.startswith("open_clip:"):
        try:
            import open_clip
        except ImportError as error:
            raise ConfigError(f"backbone {name!r} needs open_clip: pip install open_clip_torch") from error
        backbone = open_clip.create_model(name.split(":", 1)[1], pretrained=None, **config.backbone_kwargs).visual
    else:
        import timm

        name = name.removeprefix("timm:")
        if not timm.is_model(name):
            raise ConfigError(f"backbone: unknown timm model {name!r} (see timm.list_models())")
        try:
            backbone = timm.create_model(name, pretrained=False, num_classes=0, **config.backbone_kwargs)
        except TypeError as error:
            raise ConfigError(f"backbone_kwargs: {error}") from error
    if config.backbone_weights:
        from stadapter.checkpoint import read_untrusted_weights

        state = read_untrusted_weights(config.backbone_weights)
        result = backbone.load_state_dict(state, strict=False)
        for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys)):
            if keys:
                raise ConfigError(f"backbone_weights {config.backbone_weights}: {kind} key {keys[0]!r}"
                                  + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""))
    return backbone


def build_model(config: TrainConfig, num_classes: int) -> VideoViT:
    """The video model of the config: adapters as `add_st_adapters` takes them, or a linear probe."""
    if config.official_checkpoint:
        if not config.backbone_weights:
            raise ConfigError("official_checkpoint needs backbone_weights: OpenAI CLIP's weights")
        model = VideoViT.from_official(config.official_checkpoint, config.backbone_weights,
                                       num_frames=config.num_frames, dropout=config.dropout)
        if model.head.out_features != num_classes:
            raise ConfigError(f"official_checkpoint has {model.head.out_features} classes, the data {num_classes}")
        return model
    backbone = build_backbone(config)
    if not config.adapters:
        return VideoViT(backbone, num_classes, config.num_frames, dropout=config.dropout, adapters=False)
    layers = config.layers
    layers = "all" if layers == "all" else int(layers) if layers.isdigit() else \
        [int(i) for i in layers.split(",")]
    return VideoViT(backbone, num_classes, config.num_frames, dropout=config.dropout, positions=config.positions,
                    layers=layers, bottleneck=config.bottleneck, kernel_t=config.kernel_t,
                    activation=config.activation)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (getrusage ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class _Metrics:
    """metrics.jsonl on rank 0, appended to (a resumed run continues the same file)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


def _loader(dataset, batch_size: int, sampler, config: TrainConfig, device: torch.device, seed: int,
            drop_last: bool) -> DataLoader:
    # Its own generator: worker seeds must not draw from the global RNG, whose state is
    # checkpointed for dropout (a resumed run makes its loader at another point of that stream).
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=config.num_workers,
                      collate_fn=collate_clips, drop_last=drop_last, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed), pin_memory=device.type == "cuda")


def _progress(total: int, initial: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True,
                leave=False)


def evaluate_dataset(model, dataset: VideoDataset, config: TrainConfig, info: Distributed) -> dict:
    """`evaluate` over `dataset`'s test views, each process scoring its share."""
    sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank, shuffle=False,
                                 drop_last=False)
    batch = max(1, config.batch_size // config.clip_config().num_views)
    loader = _loader(dataset, batch, sampler, config, info.device, config.seed, drop_last=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", VideoSkippedWarning)  # counted in the result instead
        return evaluate(model, loader, info, config.amp)


def train(config: TrainConfig) -> dict:
    """Train as `config` says; returns a summary (final evaluation, throughput, files).

    Raises `ConfigError` for settings or data that cannot work and `CheckpointError` for a
    `--resume` checkpoint that is damaged or does not fit.
    """
    config.check_paths()
    info = init_distributed(config.device)
    try:
        return Trainer(config, info).run()
    finally:
        shutdown(info)


class Trainer:
    """One training run: data, model, optimizer, schedule and checkpoints (`train` runs it).

    `model`, if given, is trained instead of the config's (clips (B, 3, T, H, W) -> logits; its
    parameters that require grad are what is trained and checkpointed). Its pieces are public
    for tests and custom loops: `epoch_loader(epoch)` gives an epoch's DataLoader (resuming
    mid-epoch where the step says), `forward_backward(batch)` one micro-batch,
    `optimizer_step()` the update.
    """

    def __init__(self, config: TrainConfig, info: Distributed, model: nn.Module | None = None):
        self.config, self.info = config, info
        if config.amp == "float16" and info.device.type != "cuda":
            raise ConfigError("amp float16 needs CUDA (use bfloat16 on the CPU)")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.output = Path(config.output_dir)
        if info.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        clip = config.clip_config()
        try:
            self.train_set = VideoDataset.from_path(config.train_data, config.data_root, clip=clip, train=True,
                                                    seed=config.seed, strict=config.strict)
            self.val_set = VideoDataset.from_path(config.val_data, config.data_root, clip=clip, train=False,
                                                  strict=config.strict) if config.val_data else None
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error
        self.num_classes = config.num_classes or self.train_set.num_classes
        for name, data in (("train_data", self.train_set), ("val_data", self.val_set)):
            if data is not None and max(data.labels) >= self.num_classes:
                raise ConfigError(f"{name} has label {max(data.labels)} but there are {self.num_classes} classes")
        torch.manual_seed(config.seed)  # the same head on every process
        self.model = (model if model is not None else build_model(config, self.num_classes)).to(info.device)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.global_batch = config.batch_size * config.accum_steps * info.world_size
        self.lr = config.lr if config.lr is not None else scaled_lr(config.blr, self.global_batch)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=self.lr)
        self.sampler = ResumableSampler(self.train_set, info.world_size, info.rank, shuffle=True, seed=config.seed,
                                        drop_last=True)
        self.steps_per_epoch = (self.sampler.num_samples // config.batch_size) // config.accum_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(f"train_data has {len(self.train_set)} videos, fewer than one global batch "
                              f"({self.global_batch} = batch_size x accum_steps x processes)")
        self.total_steps = config.epochs * self.steps_per_epoch
        warmup = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup, self.total_steps, min(config.min_lr / self.lr, 1.0)))
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=config.amp == "float16")
        self.step = 0
        self.skipped: set[str] = set()
        self.evals: list[dict] = []
        self.metrics = _Metrics(self.output / "metrics.jsonl", info.is_main)
        self.resumed_from = self._resume()
        if self.resumed_from is None:  # dropout differs per process; a resumed run has its RNG back
            torch.manual_seed(config.seed + 1 + info.rank)
        self.forward_model = self.model
        if config.compile:
            self.model.compile()
        if info.enabled:
            self.forward_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    # ---- checkpoints ----

    def _resume(self) -> str | None:
        config = self.config
        path = config.resume
        if path is None and config.auto_resume:
            path = latest_valid_checkpoint(self.output)
        if path is None:
            return None
        state = load_checkpoint(path, self.model)  # CheckpointError for a damaged --resume
        if state["steps_per_epoch"] != self.steps_per_epoch or state["world_size"] != self.info.world_size:
            raise CheckpointError(f"{path}: written with {state['world_size']} processes and {state['steps_per_epoch']} "
                                  f"steps per epoch, this run has {self.info.world_size} and {self.steps_per_epoch}: "
                                  "the data order would not continue")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"][self.info.rank])
        self.step = int(state["step"])
        self.skipped = set(state["skipped"])
        self.evals = list(state["evals"])
        if self.info.is_main:
            print(f"resumed from {path} at step {self.step}", flush=True)
        return str(path)

    def _save(self) -> None:
        rngs = all_gather_objects(rng_state(), self.info)
        skipped = set().union(*all_gather_objects(self.skipped, self.info))
        if self.info.is_main:
            state = {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "world_size": self.info.world_size,
                     "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": rngs, "skipped": sorted(skipped),
                     "evals": self.evals}
            config = {**self.config.to_dict(), "num_classes": self.num_classes}  # what eval rebuilds
            save_checkpoint(self.output, self.model, state, config, keep=self.config.keep_checkpoints)
        if self.info.enabled:
            torch.distributed.barrier()

    # ---- evaluation ----

    def _evaluate(self, epoch: float) -> dict:
        result = evaluate_dataset(self.model, self.val_set, self.config, self.info)
        result.update(step=self.step, epoch=epoch)
        self.evals.append(result)
        self.metrics.write({"kind": "eval", **result})
        if self.info.is_main:
            print(f"eval at step {self.step} (epoch {epoch:g}): top-1 {result['top1']:.2f}%, top-5 "
                  f"{result['top5']:.2f}%, {result['videos']} videos", flush=True)
        return result

    # ---- training ----

    def _stop_at(self) -> int:
        return min(self.total_steps, self.config.max_steps or self.total_steps)

    def run(self) -> dict:
        config, info = self.config, self.info
        stop = self._stop_at()
        bar = _progress(stop, self.step, info.is_main and config.progress, "train")
        started = time.perf_counter()
        train_seconds, trained_clips = 0.0, 0
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        while self.step < stop:
            loader = self.epoch_loader(self.step // self.steps_per_epoch)
            self.model.train()
            micro = 0
            step_start = time.perf_counter()
            for batch in loader:
                last_micro = (micro + 1) % config.accum_steps == 0
                window_loss += self.forward_backward(batch, sync=last_micro) / config.accum_steps
                micro += 1
                if not last_micro:
                    continue
                self.optimizer_step()
                window_steps += 1
                now = time.perf_counter()
                train_seconds += now - step_start
                trained_clips += self.global_batch
                step_start = now
                bar.update(1)
                if self.step % config.log_every == 0 or self.step == stop:
                    self._log(window_loss / window_steps, window_steps * self.global_batch / (now - window_start), bar)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if self.step % self.steps_per_epoch == 0 or self.step >= stop:
                    break
            self._end_of_stretch(stop)
        bar.close()
        return self._finish(time.perf_counter() - started, train_seconds, trained_clips)

    def epoch_loader(self, epoch: int) -> DataLoader:
        """The DataLoader of `epoch`, starting after the micro-batches `self.step` has done in it."""
        config = self.config
        self.sampler.set_epoch(epoch)
        self.train_set.set_epoch(epoch)
        done = self.step - epoch * self.steps_per_epoch
        self.sampler.skip = max(done, 0) * config.accum_steps * config.batch_size
        return _loader(self.train_set, config.batch_size, self.sampler, config, self.info.device,
                       config.seed * 100003 + epoch, drop_last=True)

    def forward_backward(self, batch: dict, sync: bool = True) -> float:
        """Loss of one micro-batch, its gradient accumulated into the trainable tensors
        (scaled by 1 / accum_steps); `sync=False` skips DDP's all-reduce (accumulation)."""
        config, info = self.config, self.info
        context = contextlib.nullcontext() if sync or not info.enabled else self.forward_model.no_sync()
        with context:
            with autocast_context(info.device, config.amp):
                logits = self.forward_model(normalize_clips(batch["clips"].to(info.device, non_blocking=True)))
            loss = nn.functional.cross_entropy(logits.float(), batch["labels"].to(info.device))
            self.scaler.scale(loss / config.accum_steps).backward()
        self.skipped.update(batch["skipped"])
        return float(loss.detach())

    def optimizer_step(self) -> None:
        if self.config.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.trainable, self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1

    def _log(self, loss: float, clips_per_second: float, bar) -> None:
        loss = mean_over_ranks(loss, self.info)
        skipped = len(set().union(*all_gather_objects(self.skipped, self.info)))
        record = {"kind": "train", "step": self.step, "epoch": self.step / self.steps_per_epoch, "loss": loss,
                  "lr": self.scheduler.get_last_lr()[0], "clips_per_s": clips_per_second, "skipped_videos": skipped}
        self.metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", clips_s=f"{clips_per_second:.1f}", refresh=False)

    def _end_of_stretch(self, stop: int) -> None:
        config = self.config
        epoch_done = self.step % self.steps_per_epoch == 0
        epoch = self.step // self.steps_per_epoch
        final = self.step >= stop
        if self.val_set is not None and (final or (epoch_done and config.eval_every and epoch % config.eval_every == 0)):
            self._evaluate(self.step / self.steps_per_epoch)
        if final or (epoch_done and config.save_every and epoch % config.save_every == 0):
            self._save()

    def _finish(self, seconds: float, train_seconds: float, trained_clips: int) -> dict:
        skipped = sorted(set().union(*all_gather_objects(self.skipped, self.info)))
        peak = max(all_gather_objects(peak_rss_mib(), self.info))
        summary = {
            "step": self.step, "total_steps": self.total_steps, "steps_per_epoch": self.steps_per_epoch,
            "epochs": self.step / self.steps_per_epoch, "global_batch": self.global_batch, "lr": self.lr,
            "processes": self.info.world_size, "num_classes": self.num_classes,
            "trainable_parameters": sum(p.numel() for p in self.trainable),
            "final_eval": self.evals[-1] if self.evals else None, "evals": self.evals,
            "seconds": seconds, "train_seconds": train_seconds,
            "clips_per_second": trained_clips / train_seconds if train_seconds else math.nan,
            "peak_rss_mib": peak, "skipped_videos": len(skipped), "skipped_paths": skipped,
            "resumed_from": self.resumed_from, "output_dir": str(self.output),
            "adapters_file": str(self.output / "adapters.safetensors"),
        }
        if self.info.is_main:
            save_adapters(self.model, self.output / "adapters.safetensors")
            (self.output / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def evaluate_checkpoint(checkpoint: str, data: str | None = None, **overrides) -> dict:
    """Top-1 / top-5 of a training checkpoint (or of the newest valid one in an output folder)
    on `data` (default: the run's val_data), with `TrainConfig` overrides such as the views."""
    from stadapter import load_adapters

    from .checkpoints import ADAPTERS, MANIFEST, read_config

    path = Path(checkpoint)
    if path.is_dir() and not (path / MANIFEST).exists():  # an output folder, not a checkpoint
        newest = latest_valid_checkpoint(path)
        if newest is None:
            raise CheckpointError(f"{checkpoint}: no valid checkpoint in this folder")
        path = newest
    saved = read_config(path)
    config = TrainConfig.from_dict({**saved, **overrides, "val_data": data or saved["val_data"]},
                                   source=f"{path}/config.json")
    if config.val_data is None:
        raise ConfigError("no evaluation data: pass --data (the run had no val_data)")
    config.check_paths(train=False)
    info = init_distributed(config.device)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        try:
            dataset = VideoDataset.from_path(config.val_data, config.data_root, clip=config.clip_config(),
                                             train=False, strict=config.strict)
        except (ValueError, FileNotFoundError) as error:
            raise ConfigError(str(error)) from error
        model = build_model(config, saved["num_classes"]).to(info.device)
        load_adapters(model, path / ADAPTERS)
        result = evaluate_dataset(model, dataset, config, info)
    finally:
        shutdown(info)
    return {**result, "checkpoint": str(path), "data": config.val_data, "views": config.clip_config().num_views}
