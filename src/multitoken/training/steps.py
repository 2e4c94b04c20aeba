"""Pieces of the trainer's step and evaluation: batch forms, the compiled model, validation sums."""
from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor

from multitoken.model.native import MTPModel
from multitoken.training.loss import MTPLoss

Batch = Any  # (tokens, doc_ids) | {"input_ids": ..., "doc_ids": ...} | tokens | a list of those


def micro_batches(batch: Batch) -> list[tuple[Tensor, Tensor | None]]:
    """Any accepted batch form as a list of (tokens (B, T), doc_ids (B, T) | None) micro-batches."""
    def one(b):
        if isinstance(b, dict):
            return b["input_ids"], b.get("doc_ids")
        if isinstance(b, Tensor):
            return b, None
        tokens, doc_ids = b
        return tokens, doc_ids

    if isinstance(batch, list):
        return [one(b) for b in batch]
    return [one(batch)]


def floats(x: Tensor) -> list[float]:
    """A 1-D tensor as Python floats (for metrics rows)."""
    return [float(v) for v in x.detach().float().cpu()]


class CompiledModel:
    """The functions the backward helpers call, compiled; parameters stay the model's."""

    def __init__(self, model: MTPModel):
        self.head_hiddens = torch.compile(model.head_hiddens)
        self.head_logits = torch.compile(model.head_logits)
        self._forward = torch.compile(model)

    def __call__(self, tokens: Tensor) -> Tensor:
        return self._forward(tokens)


@torch.no_grad()
def validation_sums(model: MTPModel, loss_fn: MTPLoss, batches: Iterable[tuple[Tensor, Tensor]],
                    device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-head (CE sum float64, counted targets, top-1 hits), each (n_future,) on the CPU, over
    ``batches`` of (tokens (B, T), doc_ids (B, T)), one head's logits at a time."""
    nf = model.cfg.n_future
    ce = torch.zeros(nf, dtype=torch.float64)
    count = torch.zeros(nf, dtype=torch.long)
    correct = torch.zeros(nf, dtype=torch.long)
    for tokens, doc_ids in batches:
        tokens, doc_ids = tokens.to(device), doc_ids.to(device)
        hiddens = model.head_hiddens(tokens)
        for i, (g, target) in enumerate(zip(hiddens, loss_fn.targets(tokens, doc_ids))):
            s, c, r = loss_fn.head_statistics(model.head_logits(i, g), target)
            ce[i] += s.double().cpu()
            count[i] += c.cpu()
            correct[i] += r.cpu()
    return ce, count, correct
