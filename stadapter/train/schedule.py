"""Learning rate: scaled by the global batch, linear warm-up, then cosine decay.

As the official code (`--blr`): the learning rate is given per 256 clips and multiplied by
global batch / 256, where the global batch counts every process and accumulation step.
"""

from __future__ import annotations

import math

REFERENCE_BATCH = 256


def scaled_lr(blr: float, global_batch: int) -> float:
    """The absolute learning rate for `blr` per 256 clips at `global_batch` clips per step."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    return blr * global_batch / REFERENCE_BATCH


class WarmupCosine:
    """Multiplier of the peak lr at optimizer step `step` (a `LambdaLR` lambda; picklable).

    Linear from 1/(warmup+1) up to 1 over `warmup_steps`, then a cosine from 1 down to
    `min_ratio` at `total_steps`, and `min_ratio` after that.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0):
        if warmup_steps < 0 or total_steps < 1 or not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"need warmup_steps >= 0, total_steps >= 1, 0 <= min_ratio <= 1, got "
                             f"{warmup_steps}, {total_steps}, {min_ratio}")
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
