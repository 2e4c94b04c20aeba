"""Packing and deterministic batching over a token store.

    PackedDataset(store, seq_len)    -> (tokens (T,), doc_ids (T,)) fixed-length windows
    batch_indices(n, step, B, seed)  -> the items of global step ``step`` for one rank
    get_batch(dataset, indices)      -> (tokens (B, T), doc_ids (B, T))

Resuming training needs only the step number: ``batch_indices`` is a pure function of
(n_items, step, batch_size, seed, rank, world_size).
"""
from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from multitoken.data.corpus import DataError
from multitoken.data.store import TokenStore


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens over the concatenated store.

    Item i is ``tokens[i*seq_len : (i+1)*seq_len]``; the tail shorter than ``seq_len``
    is dropped. ``doc_ids`` holds the store's document index of each token.
    """

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        # Offsets are small (one int64 per document): keep them in RAM for searchsorted.
        self._offsets = np.asarray(store.doc_offsets, dtype=np.int64)

    def __len__(self) -> int:
        return self.store.n_tokens // self.seq_len

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """Returns tokens (seq_len,) long and doc_ids (seq_len,) long."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} sequences")
        start = i * self.seq_len
        tokens = np.asarray(self.store.tokens[start:start + self.seq_len], dtype=np.int64)
        pos = np.arange(start, start + self.seq_len)
        doc_ids = np.searchsorted(self._offsets, pos, side="right") - 1  # (T,)
        return torch.from_numpy(tokens), torch.from_numpy(doc_ids.astype(np.int64))


# --------------------------------------------------------------------------- batching


def steps_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch (the partial last batch is dropped)."""
    return n_items // (batch_size * world_size)


@functools.lru_cache(maxsize=2)
def _epoch_perm(n_items: int, seed: int, epoch: int) -> np.ndarray:
    # numpy's PCG64 stream is stable across releases, and (seed, epoch) seeds it directly.
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    perm.flags.writeable = False
    return perm


def batch_indices(n_items: int, step: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Items of global step ``step`` for ``rank``: a pure function, so resuming needs the
    step only. Each epoch is a fresh permutation seeded by (seed, epoch); step s takes the
    s-th global batch of ``batch_size * world_size`` items and rank r its r-th slice, so
    ranks are disjoint within a step and no item repeats within an epoch."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got {step}, {seed}")
    spe = steps_per_epoch(n_items, batch_size, world_size)
    if spe == 0:
        raise DataError(f"{n_items} sequences are fewer than one global batch of "
                        f"{batch_size * world_size}; use more data or a smaller batch/seq_len")
    epoch, within = divmod(step, spe)
    g = batch_size * world_size
    start = within * g + rank * batch_size
    return _epoch_perm(n_items, seed, epoch)[start:start + batch_size].tolist()


def get_batch(dataset: PackedDataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Stack items into tokens (B, T) long and doc_ids (B, T) long."""
    items = [dataset[i] for i in indices]
    return torch.stack([t for t, _ in items]), torch.stack([d for _, d in items])
