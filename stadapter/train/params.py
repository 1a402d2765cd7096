"""AdamW parameter groups: weight decay on weight matrices only.

Biases, norm scales and every other tensor with one dimension (or none) get no decay, as in
the official code; the adapters' temporal conv weight (Ca, 1, kt, 1, 1) is a weight and decays.
"""

from __future__ import annotations

from torch import nn


def decays(name: str, parameter) -> bool:
    """Whether `parameter` (named `name`) gets weight decay."""
    return parameter.ndim > 1 and not name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: with and without decay (empty groups dropped)."""
    with_decay, without = [], []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            (with_decay if decays(name, parameter) else without).append(parameter)
    groups = [{"params": with_decay, "weight_decay": weight_decay}, {"params": without, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups
