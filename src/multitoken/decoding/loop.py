"""The one step loop behind every decoding mode.

:func:`decode_loop` owns what all modes share: prefill and the first emitted token, the
draft-depth limit of each step (what rows may still emit, what the context still holds),
committing the accepted block, dropping finished rows from the batch (or, for a model that
cannot select rows, letting them commit nothing) and the per-row bookkeeping (emit, record
acceptance). A :class:`Stepper` supplies only what differs between modes:
how a step drafts, verifies and picks the accepted tokens (:mod:`multitoken.decoding.chain`
for plain / self-speculative / draft-model decoding, :mod:`multitoken.decoding.tree_verify`
for tree verification).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from multitoken.decoding.batch import Tracker, capacity, prefill
from multitoken.decoding.sampling import Sampler
from multitoken.model.protocol import MTPDecoderModel, supports_row_selection


@dataclass
class StepResult:
    """What one verify step accepted, per batch position (rows that are done are ignored)."""

    next_tokens: Tensor  # (B,) the token after the accepted drafts: emitted, the next step's pending token
    counts: Tensor  # (B,) block positions to commit: the pending token + accepted drafts
    keep: Tensor | None  # (B, M) which block positions (a tree path, ascending); None = a prefix
    emitted: list[list[int]]  # per row: accepted drafts + next token
    accepted: list[int]  # per row: drafts accepted
    drafted: list[int] | None  # per row: drafts verified on the accepted path; None = a plain step (not recorded)
    nodes: list[int] | None = None  # per row: tree nodes verified, root included (tree mode only)
    from_lookup: list[int] | None = None  # per row: accepted drafts that only prompt lookup proposed


class Stepper(Protocol):
    """One decoding mode's step: draft, verify, choose what to accept."""

    extra_capacity: int  # cache slots a step needs beyond prompt + max_new_tokens
    can_select: bool  # whether ``select`` works (e.g. a draft model that cannot select rows: no)

    def start(self, state, rows: list[Tensor]) -> None:
        """Called once after the prompts are prefilled (``state`` holds them)."""

    def want(self) -> int:
        """Draft depth this step would like (the loop caps it)."""

    def step(self, state, pending: Tensor, depth: int) -> StepResult:
        """Draft at most ``depth`` tokens after ``pending`` (B,), verify them in one target pass
        (depth 0: verify the pending token alone) and choose the accepted tokens."""

    def committed(self, result: StepResult, counts: Tensor, active: list[bool]) -> None:
        """The loop committed ``counts`` (B,) block positions of ``result``; ``active``: rows not done."""

    def select(self, index: Tensor) -> None:
        """The batch keeps only rows ``index`` (B',) long, in that order (the model's state already did)."""


def decode_loop(model: MTPDecoderModel, rows: list[Tensor], sampler: Sampler, tracker: Tracker,
                stepper: Stepper, context: int | None = None) -> None:
    """Decode the batch ``rows`` until every row is done; ``tracker`` collects the output.

    context: the longest sequence every model involved accepts (default ``model.max_seq_len``).
    Rows that finish leave the batch where the model (and the stepper) can select rows
    (:func:`~multitoken.model.protocol.supports_row_selection`); otherwise they stay in it
    and commit nothing. ``order[i]`` is the original row at batch position i.
    """
    batch, device = len(rows), rows[0].device
    context = model.max_seq_len if context is None else context
    state = model.new_state(batch, capacity(rows, tracker.max_new, stepper.extra_capacity))
    pending = sampler.choose(prefill(model, state, rows))  # (B,) first new token: emitted, not yet in the cache
    tracker.forward_passes += 1
    tracker.row_passes += batch
    for b in range(batch):
        tracker.emit(b, [int(pending[b])])
    stepper.start(state, rows)
    order = list(range(batch))
    shrink = supports_row_selection(model) and stepper.can_select
    while not tracker.all_done:
        if shrink and any(tracker.done[b] for b in order):
            keep = [i for i, b in enumerate(order) if not tracker.done[b]]
            index = torch.tensor(keep, dtype=torch.long, device=device)
            state = model.select_rows(state, index)
            stepper.select(index)
            pending, order = pending[index], [order[i] for i in keep]
        active = [not tracker.done[b] for b in order]
        # Never draft past what any active row may still emit, nor past the context.
        depth = max(0, min(stepper.want(), tracker.room() - 1, context - int(state.lengths.max()) - 1))
        result = stepper.step(state, pending, depth)
        tracker.forward_passes += 1
        tracker.depths[min(depth, tracker.num_draft)] += 1
        # Finished rows still in the batch commit nothing, so their caches stop growing.
        counts = torch.where(torch.tensor(active, device=device), result.counts, torch.zeros_like(result.counts))
        model.accept(state, result.keep, counts)
        stepper.committed(result, counts, active)
        for i, b in enumerate(order):
            if not active[i]:
                continue
            tracker.row_passes += 1
            if result.nodes is not None:
                tracker.node_sum += result.nodes[i]
                tracker.node_steps += 1
            if result.drafted is not None:
                tracker.record(b, result.accepted[i], result.drafted[i])
            if result.from_lookup is not None:
                tracker.lookup_tokens += result.from_lookup[i]
            tracker.emit(b, result.emitted[i])
        pending = result.next_tokens
