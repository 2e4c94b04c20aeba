"""The one model protocol that every decoder, the tree verifier and the benchmarks use.

Both the native :class:`multitoken.model.native.MTPModel` and the Hugging Face wrapper
(:class:`multitoken.hf.wrapper.MTPHeadsForCausalLM`, exported as ``multitoken.hf.MTPHeadsForCausalLM``)
implement it, so each decoding
algorithm exists once.

Cache convention. A decode state holds, per batch row ``b``, the key/value entries of
the first ``state.lengths[b]`` committed tokens. The most recently emitted token is *not*
in the cache yet: it is the first input of the next ``verify`` call. ``verify`` writes
*pending* entries for a block of ``W`` new tokens at positions
``lengths[b] .. lengths[b] + W - 1`` without committing them; ``accept`` then commits a
chosen subset (a prefix for chains, a root-to-leaf path for trees), moving those entries
into contiguous positions and discarding the rest.

Optional: ``select_rows(state, index)`` (:class:`RowSelectingModel`) returns a state holding only
some rows, so a batch can drop rows that finished (EOS or max_new_tokens) and stop paying for
them; a model without it keeps finished rows in the batch, committing nothing
(:func:`supports_row_selection` tells which).

Optional hints for the decoders' cost-aware defaults (:class:`DecodeHints`; absent = None):
``draft_acceptance`` (num_heads, top_k) P(rank r of head j+1 is the base's next token), from
which tree decoding builds the tree with the best expected tokens per cost on this machine;
``draft_tree``, a saved tree (list of paths) to use when there is no table; ``cost_key``, a
dict of settings that change pass costs (e.g. which kernels the forward uses), so a
calibration made under other settings is not reused; ``identity``, a dict whose
``fingerprint`` names the weights. :func:`decode_hint` reads them.

Greedy passes: inside :func:`greedy_verify`, the caller uses each verify position's argmax only, so a
model may return logits that are exact only where they can be the maximum (the HF wrapper's
bfloat16 vocabulary screen, :mod:`multitoken.hf.vocab_screen`); the argmax is the same.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, Protocol, runtime_checkable

import torch
from torch import Tensor

from multitoken.errors import MultitokenError

# pick(logits (B, V), j) -> tokens (B,): chooses draft token j from head j+1's logits.
# Chained heads (``sequential``) condition later drafts on earlier picks.
DraftPicker = Callable[[Tensor, int], Tensor]
_passes = threading.local()


@contextlib.contextmanager
def greedy_verify(enabled: bool = True) -> Iterator[None]:
    """While active (and ``enabled``), verify passes need only each position's argmax
    (greedy decoding); see the module docstring. Nests; per thread."""
    before = getattr(_passes, "greedy", False)
    _passes.greedy = enabled
    try:
        yield
    finally:
        _passes.greedy = before


def greedy_verify_active() -> bool:
    """Whether the current verify pass may return argmax-exact logits (:func:`greedy_verify`)."""
    return getattr(_passes, "greedy", False)


@runtime_checkable
class DecodeState(Protocol):
    lengths: Tensor  # (B,) long: committed tokens per row
    capacity: int  # cache slots per row


@runtime_checkable
class MTPDecoderModel(Protocol):
    vocab_size: int
    n_future: int  # heads, including the base next-token head 0
    max_seq_len: int  # longest context the model accepts

    def new_state(self, batch_size: int, capacity: int) -> DecodeState:
        """Empty caches for ``batch_size`` rows of at most ``capacity`` tokens."""
        ...

    def verify(self, state: DecodeState, tokens: Tensor, tree_mask: Tensor | None = None,
               depths: Tensor | None = None) -> Tensor:
        """Run the base model over a block of new tokens; return base-head logits.

        tokens: (B, W) long, placed at positions ``lengths[b] + depth``.
        tree_mask: (W, W) or (B, W, W) bool, ``tree_mask[i, j]`` = block token i may attend
            to block token j (ancestors and itself). None means causal (a chain).
        depths: (W,) or (B, W) long depth of each block token; None means ``arange(W)``.
        Returns logits (B, W, V) float32 (inside :func:`greedy_verify`: their argmax may be
        all that is exact). Nothing is committed until ``accept``.
        """
        ...

    def accept(self, state: DecodeState, keep: Tensor | None, counts: Tensor) -> None:
        """Commit block positions ``keep[b, :counts[b]]`` (ascending) of the last ``verify``.

        keep: (B, M) long, or None for a prefix (a chain). counts: (B,) long. Row b's committed length grows by counts[b].
        """
        ...

    def crop(self, state: DecodeState, lengths: Tensor) -> None:
        """Shorten each row to ``lengths[b]`` committed tokens (discarding later ones)."""
        ...

    def draft(self, state: DecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        """Draft ``num_draft`` tokens after ``next_tokens`` from heads 1..num_draft.

        next_tokens: (B,) the pending token that follows each row's last committed token.
        Returns (tokens (B, num_draft) long, logits (B, num_draft, V) float32), where
        logits[:, j] are the raw (unwarped) logits of head j+1 at the last committed
        position and tokens[:, j] = pick(logits[:, j], j).
        """
        ...


@runtime_checkable
class RowSelectingModel(MTPDecoderModel, Protocol):
    """A decoder model that can shrink a batch (the optional part of the protocol)."""

    def select_rows(self, state: DecodeState, index: Tensor) -> DecodeState:
        """A state holding only rows ``index`` ((B',) long, in that order) of ``state``: their
        caches, committed lengths, head decode state and committed sequence. Called between
        steps (after ``accept``); ``state`` itself must not be used afterwards."""
        ...


@runtime_checkable
class DecodeHints(Protocol):
    """What a model may tell the decoders' defaults (see the module docstring); each may be None."""

    draft_acceptance: Tensor | None  # (num_heads, top_k) float
    draft_tree: list[list[int]] | None  # paths of a saved static tree
    cost_key: dict | None  # settings that change pass costs
    identity: dict | None  # {"fingerprint": ..., ...}


HINTS = ("draft_acceptance", "draft_tree", "cost_key", "identity")


def decode_hint(model, name: str):
    """The optional hint ``name`` of :data:`HINTS` that ``model`` offers, else None."""
    if name not in HINTS:
        raise KeyError(f"unknown decode hint {name!r}; hints: {', '.join(HINTS)}")
    return getattr(model, name, None)


def supports_row_selection(model) -> bool:
    """Whether ``model`` implements the optional ``select_rows``."""
    return callable(getattr(model, "select_rows", None))


def check_row_index(index: Tensor, batch: int) -> None:
    """``select_rows``'s index: 1-D integer, each entry a row of a batch of ``batch``, none twice."""
    if index.dim() != 1 or index.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"select_rows needs a 1-D integer index, got {index.dtype} of shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= batch
                          or index.unique().numel() != index.numel()):
        raise IndexError(f"select_rows index {index.tolist()} is not a set of distinct rows of a batch of {batch}")


class ConfigDecoderAttributes:
    """The protocol's ``vocab_size`` / ``n_future`` / ``max_seq_len``, read from ``self.cfg``
    (an MTPConfig) — shared by the native model and the Hugging Face wrapper."""

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def n_future(self) -> int:
        return self.cfg.n_future

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def check_num_draft(self, num_draft: int) -> None:
        """``draft`` can run heads 1..n_future-1 only."""
        if not 0 <= num_draft <= self.cfg.n_future - 1:
            raise MultitokenError(f"num_draft={num_draft} but the model has {self.cfg.n_future - 1} draft heads")
