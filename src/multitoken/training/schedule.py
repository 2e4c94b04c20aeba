"""The one learning-rate schedule and the one optimizer parameter-group rule, for both trainers
(:class:`~multitoken.training.trainer.MTPTrainer` and :func:`~multitoken.training.heads.train_heads`)."""
from __future__ import annotations

import math
from typing import Iterable

from torch import nn


def lr_factor(step: int, warmup: int, total: int, final_ratio: float, progress: float | None = None) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then
    cosine decay to ``final_ratio`` at the last step.

    ``progress`` in [0, 1] replaces the step-based position after warm-up (time-budgeted runs
    decay over elapsed time, so the schedule ends when the budget does)."""
    if step < warmup:
        return (step + 1) / warmup
    if progress is None:
        progress = (step - warmup) / max(1, total - warmup - 1)
    progress = min(1.0, max(0.0, progress))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(modules: nn.Module | Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups over the trainable parameters of ``modules``: weight decay on 2-D weights
    (matrices, embeddings) only; norms and biases are exempt."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    decay, no_decay = [], []
    for module in modules:
        for _, p in module.named_parameters():  # unique parameters, deterministic order
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
