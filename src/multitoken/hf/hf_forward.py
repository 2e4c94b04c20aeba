"""The fallback decode path of a wrapped base: its own HF forward over transformers' ``DynamicCache``.

Architectures without a lean forward (:func:`multitoken.hf.lean_forward.lean_forward_unsupported`,
e.g. GPT-2) or ``fast_forward=False`` decode here. HF's forward takes one length for the whole
batch and appends every block it sees, so each batch row keeps its own ``DynamicCache``
(:class:`DynamicCacheRows`) and :func:`hf_forward_rows` runs the rows one at a time: exact, but a
batch of B costs B forward calls per verify pass.
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from multitoken.hf.loading import require_package


class DynamicCacheAdapter:
    """One row's transformers ``DynamicCache`` behind :class:`~multitoken.model.layers.KVCache`'s
    ``commit`` / ``crop``, for that row.

    HF's forward appends every block it sees; ``length`` counts the committed positions, and
    ``commit`` keeps a prefix (a slice) or a tree path (a gather) of the last block.
    """

    def __init__(self, config):
        require_package("transformers", "pip install transformers")
        from transformers import DynamicCache
        self.hf = DynamicCache(config=config)
        self.length = 0

    def drop_pending(self) -> None:
        """Forget a block that was verified but never committed (HF appended it anyway)."""
        if self.hf.get_seq_length() > self.length:
            self._keep(self.length)

    def commit(self, keep: Tensor | None, count: int) -> None:
        """Keep block offsets keep[:count] (None = a prefix) of the last block."""
        if keep is None:
            self._keep(self.length + count)
        else:
            self._keep(self.length, keep[:count])
        self.length += count

    def crop(self, length: int) -> None:
        self.length = length
        self._keep(length)

    def _keep(self, length: int, path: Tensor | None = None) -> None:
        """Keep the first ``length`` positions (a slice) and, for a tree, then the block offsets
        ``path`` after them (a gather)."""
        if path is not None:
            index = torch.cat([torch.arange(length, device=path.device), length + path])
        for layer in self.hf.layers:
            if path is None:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
            else:
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)


class DynamicCacheRows:
    """One :class:`DynamicCacheAdapter` per batch row, with KVCache's batched ``commit`` / ``crop`` /
    ``select``."""

    def __init__(self, config, batch_size: int, rows: list[DynamicCacheAdapter] | None = None):
        self.config = config
        self.rows = rows if rows is not None else [DynamicCacheAdapter(config) for _ in range(batch_size)]

    def commit(self, keep: Tensor | None, counts: Tensor) -> None:
        for b, row in enumerate(self.rows):
            row.commit(None if keep is None else keep[b], int(counts[b]))

    def crop(self, lengths: Tensor) -> None:
        for row, length in zip(self.rows, lengths.tolist()):
            row.crop(int(length))

    def select(self, index: Tensor) -> "DynamicCacheRows":
        """The rows ``index`` (B',) in that order (the caches are shared, not copied)."""
        return DynamicCacheRows(self.config, len(index), [self.rows[i] for i in index.tolist()])


def cache_keyword(base: nn.Module) -> str:
    """The name the base model's forward takes its cache under (``cache`` or ``past_key_values``)."""
    params = inspect.signature(type(base.base_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def hf_forward_rows(base: nn.Module, cache_kw: str, cache: DynamicCacheRows, tokens: Tensor,
                    tree_mask: Tensor | None, depths: Tensor | None) -> Tensor:
    """tokens (B, W) after each row's committed prefix -> final-norm hidden (B, W, d), one row at a time.

    tree_mask: (W, W) or (B, W, W) bool or None (causal); depths: (W,) or (B, W) or None (arange).
    """
    batch, width = tokens.shape
    if depths is None:
        depths = torch.arange(width, device=tokens.device)
    depths = depths.to(tokens.device).reshape(-1, width).expand(batch, width)
    masks = None if tree_mask is None else tree_mask.to(tokens.device).reshape(-1, width, width).expand(
        batch, width, width)
    out = [_forward_row(base, cache_kw, row, tokens[b:b + 1], depths[b], None if masks is None else masks[b])
           for b, row in enumerate(cache.rows)]
    return torch.cat(out)


def _forward_row(base: nn.Module, cache_kw: str, row: DynamicCacheAdapter, tokens: Tensor, depths: Tensor,
                 tree_mask: Tensor | None) -> Tensor:
    """One row: tokens (1, W), depths (W,), tree_mask (W, W) or None -> hidden (1, W, d)."""
    width, dtype = tokens.shape[1], base.get_output_embeddings().weight.dtype
    row.drop_pending()  # keeps "nothing is committed until accept" (e.g. timing repeated verifies)
    kwargs = {cache_kw: row.hf, "position_ids": (row.length + depths)[None], "use_cache": True}
    if tree_mask is not None:
        prefix = torch.ones(width, row.length, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([prefix, tree_mask], dim=1)[None, None]  # (1, 1, W, L + W) True = attend
        kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=dtype, device=tokens.device) \
            .masked_fill(~mask, torch.finfo(dtype).min)
    return base.base_model(input_ids=tokens, **kwargs).last_hidden_state
