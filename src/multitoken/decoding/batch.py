"""Helpers every decoder shares: prompt rows, context fitting, cache sizing, prefill and the
per-row :class:`Tracker` (outputs, stopping, acceptance counters).

A batch is a list of 1-D prompt rows of different lengths; rows are padded only for a
forward pass (padding is never committed), so each row keeps its own cache length.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel

TokenCallback = Callable[[int, list[int]], None]  # (row, newly accepted token ids)


def as_rows(prompt_ids, device) -> list[Tensor]:
    """Prompts as a list of 1-D long rows on ``device``.

    prompt_ids: (B, T) or (T,) LongTensor, or a list of 1-D sequences of different lengths.
    Raises MultitokenError for no prompts, an empty prompt or a tensor of another rank.
    """
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise MultitokenError(f"prompt_ids must be (B, T) or a list of 1-D tensors, "
                                  f"got shape {tuple(prompt_ids.shape)}")
        rows = list(prompt_ids)
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in prompt_ids]
    if not rows:
        raise MultitokenError("no prompts given")
    for r in rows:
        if r.dim() != 1 or r.numel() == 0:
            raise MultitokenError("empty prompt: every prompt needs at least one token")
    return [r.to(device=device, dtype=torch.long) for r in rows]


def pad_rows(rows: Sequence[Tensor]) -> Tensor:
    """Right-pad 1-D rows with token 0 (padding is never committed) -> (B, T_max)."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def fit_context(rows: list[Tensor], model, max_new: int, truncate: str | None, who: str = "model") -> list[Tensor]:
    """Rows that leave room for ``max_new`` tokens in ``model.max_seq_len``: too long a row
    raises MultitokenError saying what would fit, or with ``truncate="left"`` loses its
    oldest tokens (at least one prompt token stays). ``who`` names the model in messages."""
    context = model.max_seq_len
    limit = context - max_new  # prompt tokens that fit
    if truncate not in (None, "left"):
        raise MultitokenError(f"truncate must be None or 'left', got {truncate!r}")
    out = []
    for r in rows:
        if len(r) > limit:
            if truncate != "left" or limit < 1:
                raise MultitokenError(too_long(len(r), max_new, context, who, truncate))
            r = r[-limit:]
        out.append(r)
    return out


def too_long(prompt: int, max_new: int, context: int, who: str, truncate: str | None) -> str:
    """What does not fit (prompt + max_new_tokens > context) and what would."""
    fits = [f"at most {context - prompt} new tokens fit after this prompt"] if prompt < context else []
    if context - max_new >= 1 and truncate != "left":
        fits.append(f"truncate='left' / --truncate left keeps its last {context - max_new} tokens")
    elif context - max_new < 1:
        fits.append(f"with truncate='left' / --truncate left (one prompt token kept) at most {context - 1} new "
                    f"tokens fit")
    return (f"prompt of {prompt} tokens + max_new_tokens={max_new} exceeds the {who}'s context of {context} tokens: "
            + "; ".join(fits))


def capacity(rows: list[Tensor], max_new: int, extra: int) -> int:
    """Cache slots per row: the longest prompt + ``max_new`` + ``extra`` (a step's uncommitted block)."""
    return max(len(r) for r in rows) + max_new + extra


def device_of(model) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-less models such as test stubs)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def prefill(model: MTPDecoderModel, state, rows: list[Tensor]) -> Tensor:
    """Run and commit the prompts; return base logits (B, V) at each row's last prompt token.
    A model with ``verify_last(state, tokens, last)`` (the HF wrapper, whose vocabulary head is
    the largest matrix) scores only those positions."""
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    score_last = getattr(model, "verify_last", None)
    if callable(score_last):
        logits = score_last(state, pad_rows(rows), lengths - 1)  # (B, V)
    else:
        logits = model.verify(state, pad_rows(rows))[torch.arange(len(rows), device=lengths.device), lengths - 1]
    model.accept(state, None, lengths)
    return logits


class Tracker:
    """Per-row outputs, stopping (EOS / max_new_tokens) and the counters behind
    :class:`~multitoken.decoding.stats.GenerationStats`.

    num_draft: the deepest draft position a step can verify (sizes the acceptance counters).
    """

    def __init__(self, batch: int, max_new: int, eos_id: int | None, num_draft: int,
                 on_tokens: TokenCallback | None):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [max_new == 0] * batch
        self.max_new, self.eos_id, self.on_tokens = max_new, eos_id, on_tokens
        self.forward_passes = 0  # target-model passes (prefill included)
        self.draft_forward_passes = 0  # separate draft-model passes
        self.row_passes = 0  # sum over rows of target passes while active
        self.attempted = [0] * num_draft
        self.accepted = [0] * num_draft
        self.histogram = [0] * (num_draft + 1)
        self.depths = [0] * (num_draft + 1)  # verify steps by the draft depth the step was allowed
        self.drafted = 0  # drafts verified, all rows
        self.node_sum, self.node_steps = 0, 0  # tree nodes verified (root included), row-steps that did
        self.lookup_tokens = 0  # accepted drafts that only prompt lookup proposed (tree mode)

    @property
    def num_draft(self) -> int:
        return len(self.accepted)

    def emit(self, row: int, tokens: list[int]) -> None:
        """Append a row's newly accepted tokens, cut at EOS and max_new_tokens."""
        if self.done[row]:
            return
        room = self.max_new - len(self.out[row])
        tokens = tokens[:room]
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id) + 1]
            self.done[row] = True
        self.out[row].extend(tokens)
        if len(self.out[row]) >= self.max_new:
            self.done[row] = True
        if self.on_tokens and tokens:
            self.on_tokens(row, tokens)

    def record(self, row: int, accepted: int, drafted: int) -> None:
        """Row drafted ``drafted`` tokens and the first ``accepted`` were accepted."""
        self.drafted += drafted
        for i in range(min(accepted + 1, drafted)):
            self.attempted[i] += 1
            self.accepted[i] += i < accepted
        self.histogram[accepted] += 1

    @property
    def all_done(self) -> bool:
        return all(self.done)

    def active(self, device) -> Tensor:
        """(B,) bool: rows still generating."""
        return torch.tensor([not d for d in self.done], device=device)

    def room(self) -> int:
        """Most tokens any active row may still emit."""
        return max(self.max_new - len(o) for o, d in zip(self.out, self.done) if not d)
