"""The draft vocabulary of head training: the N most frequent base-greedy tokens of a hidden cache.

Heads with a draft vocabulary score only those N rows of the shared unembedding; targets outside
it are left out of their cross-entropy (no draft can produce them).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from multitoken.hf.doc_packing import TEXT
from multitoken.model.targets import IGNORE_INDEX


def draft_vocab_from_counts(counts: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` most frequent token ids (ties by lower id), ``always`` ids included, sorted."""
    counts = np.asarray(counts, dtype=np.int64).copy()
    for t in always:
        if t is not None and 0 <= t < len(counts):
            counts[t] = np.iinfo(np.int64).max  # forced in
    size = min(size, len(counts))
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id asc
    return np.sort(order[:size]).astype(np.int64)


def draft_vocab_from_cache(cache, size: int, rows: np.ndarray | None = None,
                           always: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """(ids, coverage): the ``size`` most frequent base-greedy tokens at the text positions (answers,
    plain text; not prompts or padding) of the cache ``rows``, and the fraction of those greedy
    tokens that the ids cover."""
    greedy, segments = np.asarray(cache.greedy), np.asarray(cache.segments)
    if rows is not None:
        T = cache.seq_len
        greedy = greedy.reshape(-1, T)[np.asarray(rows)].reshape(-1)
        segments = segments.reshape(-1, T)[np.asarray(rows)].reshape(-1)
    greedy = greedy[segments == TEXT]
    counts = np.bincount(greedy.astype(np.int64), minlength=cache.vocab_size)
    ids = draft_vocab_from_counts(counts, size, always)
    return ids, float(counts[ids].sum() / max(1, counts.sum()))


def vocab_index(ids: Tensor, vocab_size: int) -> Tensor:
    """(V,) long: full-vocabulary id -> its draft index, IGNORE_INDEX for ids outside the draft vocab."""
    index = torch.full((vocab_size,), IGNORE_INDEX, dtype=torch.long)
    index[ids.cpu()] = torch.arange(len(ids))
    return index
