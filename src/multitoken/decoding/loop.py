"""The one step loop behind every decoding mode.

:func:`decode_loop` owns what all modes share: prefill and the first emitted token, the
draft-depth limit of each step (what rows may still emit, what the context still holds),
committing the accepted block (finished rows commit nothing) and the per-row bookkeeping
(emit, record acceptance). A :class:`Stepper` supplies only what differs between modes:
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
from multitoken.model.protocol import MTPDecoderModel


@dataclass
class StepResult:
    """What one verify step accepted, per batch row (rows that are done are ignored)."""

    next_tokens: Tensor  # (B,) the token after the accepted drafts: emitted, the next step's pending token
    counts: Tensor  # (B,) block positions to commit: the pending token + accepted drafts
    keep: Tensor | None  # (B, M) which block positions (a tree path, ascending); None = a prefix
    emitted: list[list[int]]  # per row: accepted drafts + next token
    accepted: list[int]  # per row: drafts accepted
    drafted: list[int] | None  # per row: drafts verified on the accepted path; None = a plain step (not recorded)
    nodes: list[int] | None = None  # per row: tree nodes verified, root included (tree mode only)


class Stepper(Protocol):
    """One decoding mode's step: draft, verify, choose what to accept."""

    extra_capacity: int  # cache slots a step needs beyond prompt + max_new_tokens

    def start(self, state, rows: list[Tensor]) -> None:
        """Called once after the prompts are prefilled (``state`` holds them)."""

    def want(self) -> int:
        """Draft depth this step would like (the loop caps it)."""

    def step(self, state, pending: Tensor, depth: int) -> StepResult:
        """Draft at most ``depth`` tokens after ``pending`` (B,), verify them in one target pass
        (depth 0: verify the pending token alone) and choose the accepted tokens."""

    def committed(self, result: StepResult, counts: Tensor, active: list[bool]) -> None:
        """The loop committed ``counts`` (B,) block positions of ``result``; ``active``: rows not done."""


def decode_loop(model: MTPDecoderModel, rows: list[Tensor], sampler: Sampler, tracker: Tracker,
                stepper: Stepper) -> None:
    """Decode the batch ``rows`` until every row is done; ``tracker`` collects the output."""
    batch, device = len(rows), rows[0].device
    state = model.new_state(batch, capacity(rows, tracker.max_new, stepper.extra_capacity))
    pending = sampler.choose(prefill(model, state, rows))  # (B,) first new token: emitted, not yet in the cache
    tracker.forward_passes += 1
    tracker.row_passes += batch
    for b in range(batch):
        tracker.emit(b, [int(pending[b])])
    stepper.start(state, rows)
    while not tracker.all_done:
        active = tracker.active(device)
        # Never draft past what any active row may still emit, nor past the context.
        room = tracker.room()
        depth = max(0, min(stepper.want(), room - 1, model.max_seq_len - int(state.lengths.max()) - 1))
        result = stepper.step(state, pending, depth)
        tracker.forward_passes += 1
        # Finished rows commit nothing, so their caches stop growing.
        counts = torch.where(active, result.counts, torch.zeros_like(result.counts))
        model.accept(state, result.keep, counts)
        stepper.committed(result, counts, [not d for d in tracker.done])
        for b in range(batch):
            if tracker.done[b]:
                continue
            tracker.row_passes += 1
            if result.nodes is not None:
                tracker.node_sum += result.nodes[b]
                tracker.node_steps += 1
            if result.drafted is not None:
                tracker.record(b, result.accepted[b], result.drafted[b])
            tracker.emit(b, result.emitted[b])
        pending = result.next_tokens
