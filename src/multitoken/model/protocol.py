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
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from torch import Tensor

from multitoken.errors import MultitokenError

# pick(logits (B, V), j) -> tokens (B,): chooses draft token j from head j+1's logits.
# Chained heads (``sequential``) condition later drafts on earlier picks.
DraftPicker = Callable[[Tensor, int], Tensor]


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
        Returns logits (B, W, V) float32. Nothing is committed until ``accept``.
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
