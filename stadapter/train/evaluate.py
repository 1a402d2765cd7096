"""Evaluation: multi-view scores averaged per video, top-1 / top-5, across processes.

Each video's V = temporal x spatial views go through the model as one batch of clips; the
softmax scores are averaged over the views, as the official test. Under DDP every process
scores its share and the (index, scores) pairs are gathered; indices the sampler padded in
twice count once.
"""

from __future__ import annotations

import contextlib
import time

import torch

from stadapter.data import normalize_clips

from .distributed import Distributed, all_gather_objects


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bfloat16" else torch.float16)


@torch.no_grad()
def evaluate(model, loader, dist_info: Distributed, amp: str = "none", progress=None) -> dict:
    """Top-1 / top-5 accuracy (%) and mean cross-entropy of the view-averaged scores, and how
    many videos were scored and skipped. `progress(iterable)` may wrap the loader (tqdm)."""
    device = dist_info.device
    model.eval()
    start = time.perf_counter()
    scored: dict[int, tuple[torch.Tensor, int]] = {}
    skipped: set[str] = set()
    for batch in (progress(loader) if progress else loader):
        clips = batch["clips"]  # (B, V, 3, T, H, W) uint8
        b, v = clips.shape[:2]
        with autocast_context(device, amp):
            logits = model(normalize_clips(clips.to(device, non_blocking=True)).flatten(0, 1))
        scores = logits.float().softmax(-1).unflatten(0, (b, v)).mean(1).cpu()
        for index, label, score in zip(batch["indices"].tolist(), batch["labels"].tolist(), scores):
            scored[index] = (score, label)
        skipped.update(batch["skipped"])
    merged: dict[int, tuple[torch.Tensor, int]] = {}
    all_skipped: set[str] = set()
    for part, part_skipped in all_gather_objects((scored, skipped), dist_info):
        merged.update(part)
        all_skipped.update(part_skipped)
    if not merged:
        raise RuntimeError("evaluation scored no videos")
    scores = torch.stack([s for s, _ in merged.values()])
    labels = torch.tensor([label for _, label in merged.values()])
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    return {
        "top1": 100.0 * float((top[:, 0] == labels).float().mean()),
        "top5": 100.0 * float((top == labels[:, None]).any(1).float().mean()),
        "loss": float(torch.nn.functional.nll_loss(scores.clamp_min(1e-12).log(), labels)),
        "videos": len(merged),
        "skipped_videos": len(all_skipped),
        "seconds": time.perf_counter() - start,
    }
