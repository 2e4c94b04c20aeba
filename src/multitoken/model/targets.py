"""Target shifting: the one place that aligns head i with token t+i+1."""
from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def shift_tokens(tokens: Tensor, k: int, fill: int) -> Tensor:
    """(B, T) -> (B, T) with out[:, t] = tokens[:, t+k], ``fill`` where t+k >= T."""
    out = torch.full_like(tokens, fill)
    if k < tokens.shape[1]:
        out[:, : tokens.shape[1] - k] = tokens[:, k:]
    return out


def shift_targets(tokens: Tensor, i: int, ignore_index: int = IGNORE_INDEX,
                  doc_ids: Tensor | None = None) -> Tensor:
    """Targets of head i: out[:, t] = tokens[:, t+i+1].

    tokens: (B, T) long; doc_ids: optional (B, T) document id of each token (packed
    sequences). Positions whose target lies past the end of the sequence, or in another
    document than token t, get ``ignore_index``. Returns (B, T) long.
    """
    if i < 0:
        raise ValueError(f"head index must be >= 0, got {i}")
    targets = shift_tokens(tokens, i + 1, ignore_index)
    if doc_ids is not None:
        if doc_ids.shape != tokens.shape:
            raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} != tokens shape {tuple(tokens.shape)}")
        other_doc = shift_tokens(doc_ids, i + 1, -1) != doc_ids
        targets = targets.masked_fill(other_doc, ignore_index)
    return targets
