"""Chain steps for :func:`~multitoken.decoding.loop.decode_loop`: plain decoding (no drafts),
self-speculative decoding (the MTP heads draft) and draft-model speculative decoding.

A step drafts k tokens after the pending one, verifies [pending, d_1..d_k] in one target
pass and accepts the longest prefix the target agrees with plus the token after it
(:func:`~multitoken.decoding.sampling.accept_chain`); committing only that prefix is the
rollback.
"""
from __future__ import annotations

import torch
from torch import Tensor

from multitoken.decoding.batch import Tracker, pad_rows
from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.decoding.loop import StepResult
from multitoken.decoding.sampling import Sampler, accept_chain
from multitoken.model.protocol import MTPDecoderModel, supports_row_selection


class ChainStep:
    """Draft up to ``k`` tokens per step (k = 0: plain decoding) from the model's heads, or
    from ``draft_model`` when given; ``policy`` picks each step's draft length (at most k)
    instead of always k."""

    def __init__(self, model: MTPDecoderModel, sampler: Sampler, tracker: Tracker, k: int,
                 draft_model: MTPDecoderModel | None = None, policy: DraftLengthPolicy | None = None):
        self.model, self.sampler, self.tracker, self.k = model, sampler, tracker, k
        self.draft_model, self.policy = draft_model, policy
        self.extra_capacity = 2 * model.n_future + k + 2
        self.can_select = draft_model is None or supports_row_selection(draft_model)
        self.drafter: DraftModelDrafter | None = None
        self.block: Tensor | None = None  # (B, 1 + depth) last step's [pending, drafts...]

    def start(self, state, rows: list[Tensor]) -> None:
        if self.policy is not None:
            self.policy.batch = len(rows)  # the verify pass costs what the whole batch costs
        if self.draft_model is not None:
            self.drafter = DraftModelDrafter(self.draft_model, rows, state.capacity + self.k + 2, self.sampler,
                                             self.tracker)

    def want(self) -> int:
        return self.k if self.policy is None else self.policy.choose()

    def step(self, state, pending: Tensor, depth: int) -> StepResult:
        model, sampler = self.model, self.sampler
        batch = pending.shape[0]
        if depth == 0:
            logits = model.verify(state, pending[:, None])  # (B, 1, V)
            accepted = torch.zeros(batch, dtype=torch.long, device=pending.device)
            nxt = sampler.choose(logits[:, 0])
            drafts = pending.new_zeros(batch, 0)
        else:
            if self.drafter is None:
                pick = (lambda lg, j: lg.argmax(-1)) if sampler.greedy else (lambda lg, j: sampler.choose(lg))
                drafts, draft_logits = model.draft(state, pending, depth, pick)
            else:
                drafts, draft_logits = self.drafter.draft(pending, depth)
            logits = model.verify(state, torch.cat([pending[:, None], drafts], 1))  # (B, k+1, V)
            accepted, nxt = accept_chain(sampler, logits, drafts, draft_logits, draft_is_greedy=False)
        self.block = torch.cat([pending[:, None], drafts], 1)
        acc, nxt_l, dr = accepted.tolist(), nxt.tolist(), drafts.tolist()
        return StepResult(nxt, accepted + 1, None, [dr[b][: acc[b]] + [nxt_l[b]] for b in range(batch)], acc,
                          [depth] * batch if depth else None)

    def committed(self, result: StepResult, counts: Tensor, active: list[bool]) -> None:
        depth = self.block.shape[1] - 1
        if self.drafter is not None:
            self.drafter.sync(self.block, counts, drafted=depth > 0)
        if self.policy is not None and depth:
            for b, on in enumerate(active):
                if on:
                    self.policy.update(result.accepted[b], depth)

    def select(self, index: Tensor) -> None:
        if self.policy is not None:
            self.policy.batch = index.shape[0]
        if self.drafter is not None:
            self.drafter.select(index)


class DraftModelDrafter:
    """A separate model drafts k tokens autoregressively; its cache follows the target's.

    The drafter may lag the target by the tokens it has not been fed yet (``unseen``):
    each round feeds them plus the pending token in one padded pass, then one token per pass.
    Its passes are counted in ``tracker.draft_forward_passes``.
    """

    def __init__(self, draft_model: MTPDecoderModel, rows: list[Tensor], capacity: int, sampler: Sampler,
                 tracker: Tracker):
        self.model, self.sampler, self.tracker = draft_model, sampler, tracker
        self.state = draft_model.new_state(len(rows), capacity)
        self.unseen = [r.clone() for r in rows]  # committed by the target, not yet fed to the drafter
        self.base = None  # (B,) drafter length before this round's pending token

    def draft(self, pending: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(tokens (B, k), raw logits (B, k, V)) drafted after ``pending`` (B,)."""
        rows = torch.arange(pending.shape[0], device=pending.device)
        feed = [torch.cat([u, pending[b:b + 1]]) for b, u in enumerate(self.unseen)]
        counts = torch.tensor([len(f) for f in feed], device=pending.device)
        logits = self.model.verify(self.state, pad_rows(feed))  # (B, W, V)
        self.model.accept(self.state, None, counts)
        self.base = self.state.lengths - 1
        last = logits[rows, counts - 1]
        tokens, all_logits = [], []
        for j in range(k):
            self.tracker.draft_forward_passes += 1
            tokens.append(self.sampler.choose(last))
            all_logits.append(last)
            if j + 1 < k:
                last = self.model.verify(self.state, tokens[-1][:, None])[:, 0]
                self.model.accept(self.state, None, torch.ones_like(counts))
        return torch.stack(tokens, 1), torch.stack(all_logits, 1)

    def select(self, index: Tensor) -> None:
        """Keep only rows ``index`` (B',) long."""
        self.state = self.model.select_rows(self.state, index)
        self.unseen = [self.unseen[i] for i in index.tolist()]
        self.base = None if self.base is None else self.base[index]

    def sync(self, block: Tensor, counts: Tensor, drafted: bool) -> None:
        """The target committed block[b, :counts[b]] (block = [pending, drafts...])."""
        if not drafted:  # a plain step: the drafter saw none of it
            self.unseen = [torch.cat([u, block[b, : int(c)]]) for b, (u, c) in enumerate(zip(self.unseen, counts))]
            return
        k = block.shape[1] - 1
        # The drafter holds [.., pending, d_1..d_{k-1}]: keep what the target committed.
        self.model.crop(self.state, self.base + torch.clamp(counts, max=k))
        self.unseen = [block[b, min(int(c), k): int(c)] for b, c in enumerate(counts)]
