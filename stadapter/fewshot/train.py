"""Meta-training and episodic evaluation of few-shot video models.

A few-shot model here is a module (MA-CLIP, `FramePrototypes`) with `forward(support, query,
class_text, shot) -> EpisodeOutput`, the same split into `support_features`, `query_features`
and `episode`, an `alpha` and a `text_conditioned` flag. Episodes come from an
`EpisodeSampler` over a `stadapter.data.VideoDataset`; class texts are encoded once per split
by a frozen text encoder and looked up per episode.

`meta_train` runs episodes with AdamW (no decay on 1-D tensors) and a warm-up cosine schedule,
as `stadapter train` does, optional autocast (AMP), a progress bar, JSONL metrics, and atomic
checkpoints of the tunable tensors only (safetensors, plus the optimizer state and the episode
count for `resume`). `evaluate` computes each test video's features once and reports the
accuracy averaged over test episodes with its 95% confidence interval.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data import VideoDataset, normalize_clips
from ..train.checkpoints import rng_state, set_rng_state
from ..train.evaluate import autocast_context
from ..train.params import param_groups
from ..train.schedule import WarmupCosine
from .episodes import EpisodeSampler
from .model import EpisodeOutput, episode_loss, episode_probabilities
from .text import TextEncoder, prompts

CHECKPOINT_TENSORS = "tunable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"  # optimizer state and every RNG state
CHECKPOINT_STATE = "state.json"


class EpisodeData(torch.utils.data.Dataset):
    """Item e: the clips of episode e of `sampler`, decoded from `videos` (uint8)."""

    def __init__(self, videos: VideoDataset, sampler: EpisodeSampler):
        self.videos, self.sampler = videos, sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def _clips(self, indices: list[int]) -> Tensor:
        clips = [self.videos[i]["clip"] for i in indices]
        # Test-time items carry a views dim (V, 3, T, H, W); episodes use the first view.
        return torch.stack([c if c.dim() == 4 else c[0] for c in clips])

    def __getitem__(self, number: int) -> dict:
        episode = self.sampler.episode(number)
        return {"support": self._clips(episode.support), "query": self._clips(episode.query),
                "classes": torch.tensor(episode.classes), "query_targets": torch.tensor(episode.query_targets)}


def episode_loader(videos: VideoDataset, sampler: EpisodeSampler, workers: int = 0, start: int = 0) -> Iterable:
    """Episodes `start`, `start + 1`, ... of `sampler` as dicts of tensors, decoded in `workers` processes."""
    data = torch.utils.data.Subset(EpisodeData(videos, sampler), range(start, len(sampler)))
    return torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=workers)


@torch.no_grad()
def class_text_table(encoder: TextEncoder, class_names: list[str]) -> Tensor:
    """Frozen features of every class prompt of a split: (classes, encoder.dim)."""
    return encoder(prompts(class_names))


@dataclass
class TrainConfig:
    """Meta-training settings (the command-line flags of `stadapter fewshot train`)."""

    way: int = 5
    shot: int = 1
    queries: int = 5
    episodes: int = 10000
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: int = 100
    amp: str = "none"  # "none", "bfloat16" or "float16" (autocast)
    log_every: int = 20
    checkpoint_every: int = 500
    seed: int = 0
    workers: int = 0


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def run_episode(model: nn.Module, batch: dict, class_text: Tensor, shot: int, amp: str = "none") -> EpisodeOutput:
    """Forward one episode batch (from `episode_loader`) through `model`."""
    device = _device(model)
    support = normalize_clips(batch["support"].to(device))
    query = normalize_clips(batch["query"].to(device))
    with autocast_context(device, amp):
        output = model(support, query, class_text[batch["classes"]].to(device), shot)
    return EpisodeOutput(*(None if t is None else t.float() for t in
                           (output.q2s_distance, output.q2t_logits, output.s2t_logits)))


def _tunable(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _atomic(path: str, write) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def save_checkpoint(directory: str, model: nn.Module, optimizer=None, scheduler=None, state: dict | None = None) -> None:
    """The tunable tensors (safetensors), the optimizer and RNG states and `state` (JSON), each written
    atomically; the JSON last, so a checkpoint whose JSON names an episode has its tensors."""
    os.makedirs(directory, exist_ok=True)
    tensors = {name: p.detach().cpu().contiguous() for name, p in _tunable(model).items()}
    _atomic(os.path.join(directory, CHECKPOINT_TENSORS), lambda path: save_file(tensors, path))
    if optimizer is not None and scheduler is not None:
        resume_state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()}
        _atomic(os.path.join(directory, CHECKPOINT_OPTIMIZER), lambda path: torch.save(resume_state, path))
    if state is not None:
        def write_state(path):
            with open(path, "w") as handle:
                json.dump(state, handle, indent=1)
        _atomic(os.path.join(directory, CHECKPOINT_STATE), write_state)


def load_tunable(directory: str, model: nn.Module) -> None:
    """Load a checkpoint's tunable tensors into `model`; every tunable tensor must be there, no other."""
    tensors = load_file(os.path.join(directory, CHECKPOINT_TENSORS))
    tunable = _tunable(model)
    missing, unexpected = sorted(set(tunable) - set(tensors)), sorted(set(tensors) - set(tunable))
    if missing or unexpected:
        raise ValueError(f"checkpoint {directory!r} does not fit the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in tunable.items():
            if p.shape != tensors[name].shape:
                raise ValueError(f"checkpoint tensor {name!r} is {tuple(tensors[name].shape)}, "
                                 f"the model's is {tuple(p.shape)}")
            p.copy_(tensors[name])


def meta_train(model: nn.Module, videos: VideoDataset, class_text: Tensor, config: TrainConfig,
               out_dir: str | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Meta-train `model` on episodes of `videos`; returns {"episodes", "seconds", "episodes_per_second", "loss"}.

    `class_text` (classes of `videos`, dim) holds the frozen class-prompt features. With
    `out_dir`, metrics go to `out_dir/metrics.jsonl` and checkpoints to `out_dir`; `resume`
    continues from the checkpoint there at the episode it had reached, with the same episodes.
    """
    sampler = EpisodeSampler(videos.labels, config.way, config.shot, config.queries, config.episodes, config.seed)
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(config.warmup, config.episodes))
    start, restored_rng = 0, None
    if resume:
        if out_dir is None or not os.path.isfile(os.path.join(out_dir, CHECKPOINT_STATE)):
            raise FileNotFoundError(f"resume needs a checkpoint in out_dir, found none in {out_dir!r}")
        load_tunable(out_dir, model)
        resume_state = torch.load(os.path.join(out_dir, CHECKPOINT_OPTIMIZER), weights_only=True)
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        restored_rng = resume_state["rng"]
        with open(os.path.join(out_dir, CHECKPOINT_STATE)) as handle:
            start = json.load(handle)["episode"]
    log = open(os.path.join(out_dir, "metrics.jsonl"), "a") if out_dir else None
    support_targets = torch.arange(config.way, device=_device(model)).repeat_interleave(config.shot)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=config.episodes, initial=start, desc="meta-train", unit="episode", leave=False)
    model.train()
    began, losses, correct, seen = time.perf_counter(), [], 0, 0
    # Making the loader's iterator draws from the global RNG; restore the checkpoint's RNG after
    # that draw, so a resumed run continues with the random numbers (dropout) it would have had.
    batches = iter(episode_loader(videos, sampler, config.workers, start))
    if restored_rng is not None:
        set_rng_state(restored_rng)
    try:
        for episode, batch in enumerate(batches, start):
            targets = batch["query_targets"].to(_device(model))
            output = run_episode(model, batch, class_text, config.shot, config.amp)
            loss = episode_loss(output, targets, support_targets, model.alpha)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            correct += (episode_probabilities(output, model.alpha).argmax(-1) == targets).sum().item()
            seen += targets.numel()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            done = episode + 1
            if log is not None and (done % config.log_every == 0 or done == config.episodes):
                record = {"episode": done, "loss": sum(losses[-config.log_every:]) / len(losses[-config.log_every:]),
                          "train_acc": correct / seen, "lr": scheduler.get_last_lr()[0],
                          "episodes_per_second": (done - start) / (time.perf_counter() - began)}
                log.write(json.dumps(record) + "\n")
                log.flush()
                correct = seen = 0
            if out_dir and (done % config.checkpoint_every == 0 or done == config.episodes):
                save_checkpoint(out_dir, model, optimizer, scheduler, {"episode": done, "config": asdict(config)})
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    seconds = time.perf_counter() - began
    trained = config.episodes - start
    return {"episodes": trained, "seconds": seconds, "episodes_per_second": trained / seconds if seconds else 0.0,
            "loss": sum(losses[-config.log_every:]) / max(1, len(losses[-config.log_every:]))}


def confidence_interval(accuracies: list[float]) -> tuple[float, float]:
    """Mean and 95% confidence half-width (normal approximation) of per-episode accuracies."""
    n = len(accuracies)
    mean = sum(accuracies) / n
    if n < 2:
        return mean, float("nan")
    std = math.sqrt(sum((a - mean) ** 2 for a in accuracies) / (n - 1))
    return mean, 1.96 * std / math.sqrt(n)


@torch.no_grad()
def video_features(model: nn.Module, videos: VideoDataset, class_text: Tensor, amp: str = "none",
                   batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """Every video's frame features once, as support (with its class text) and as query.

    In eval mode a video's features do not depend on the episode it is drawn into, so episodes
    only gather them and run the model's `episode` head. Returns (support, query), each indexed
    by video first (the models' `support_features` / `query_features` outputs); the same tensor
    twice for models whose support ignores text.
    """
    device = _device(model)
    labels = torch.tensor(videos.labels)
    support, query = [], []
    for start in range(0, len(videos), batch_size):
        indices = range(start, min(start + batch_size, len(videos)))
        clips = [videos[i]["clip"] for i in indices]
        clips = normalize_clips(torch.stack([c if c.dim() == 4 else c[0] for c in clips]).to(device))
        with autocast_context(device, amp):
            query.append(model.query_features(clips).float())
            if model.text_conditioned:
                text = class_text[labels[list(indices)]].to(device)
                support.append(model.support_features(clips, text).float())
    query = torch.cat(query)
    return (torch.cat(support) if support else query), query


@torch.no_grad()
def evaluate(model: nn.Module, videos: VideoDataset, class_text: Tensor, way: int, shot: int, queries: int,
             episodes: int, seed: int = 0, amp: str = "none", features: tuple[Tensor, Tensor] | None = None) -> dict:
    """Accuracy over `episodes` test episodes: {"accuracy", "ci95", "episodes", "way", "shot"} (percent).

    `features`, from `video_features`, saves recomputing them when one model is tested at several shots.
    """
    sampler = EpisodeSampler(videos.labels, way, shot, queries, episodes, seed)
    model.eval()
    support_frames, query_frames = features if features is not None else video_features(model, videos, class_text, amp)
    device = support_frames.device
    accuracies = []
    for episode in sampler:
        output = model.episode(support_frames[episode.support], query_frames[episode.query],
                               class_text[episode.classes].to(device), shot)
        output = EpisodeOutput(*(None if t is None else t.float() for t in
                                 (output.q2s_distance, output.q2t_logits, output.s2t_logits)))
        predicted = episode_probabilities(output, model.alpha).argmax(-1).cpu()
        accuracies.append((predicted == torch.tensor(episode.query_targets)).float().mean().item() * 100)
    mean, half_width = confidence_interval(accuracies)
    return {"accuracy": mean, "ci95": half_width, "episodes": episodes, "way": way, "shot": shot}
