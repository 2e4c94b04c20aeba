"""Decoding: plain autoregressive, self-speculative (MTP heads draft) and draft-model
speculative decoding, batched, greedy or lossless sampling.

Models are reached only through the protocol in ``protocol.py`` (new_state / verify /
accept / crop / draft), so the same loop drives the native model and wrapped HF models.
Each step is small and explicit: draft -> verify -> accept -> commit (rollback = commit
only the accepted prefix).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.model.protocol import MTPDecoderModel
from multitoken.decoding.sampling import Sampler, accept_chain

MODES = ("ar", "spec", "draft", "tree")
TokenCallback = Callable[[int, list[int]], None]  # (row, newly accepted token ids)


@dataclass
class GenerationStats:
    new_tokens: int = 0  # tokens emitted, all rows
    forward_passes: int = 0  # target-model passes (prefill included)
    draft_forward_passes: int = 0  # separate draft-model passes (mode="draft")
    tau: float = 0.0  # tokens per target pass per row (bonus token included)
    acceptance_rates: list[float] = field(default_factory=list)  # P(draft i accepted | drafts < i accepted)
    draft_attempted: list[int] = field(default_factory=list)  # per draft position: row-steps that verified it
    draft_accepted: list[int] = field(default_factory=list)  # ... and accepted it
    drafts_per_step: float = 0.0  # mean drafts verified per row-step (< num_draft with draft_cost)
    accepted_histogram: list[int] = field(default_factory=list)  # verify steps that accepted j drafts
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
    tree_nodes_per_step: float = 0.0  # mode="tree": mean verified nodes per step

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per row (EOS included if hit)
    stats: GenerationStats


class _Tracker:
    """Per-row outputs, stopping (EOS / max_new_tokens) and acceptance counters."""

    def __init__(self, batch: int, max_new: int, eos_id: int | None, num_draft: int, on_tokens):
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.done = [max_new == 0] * batch
        self.max_new, self.eos_id, self.on_tokens = max_new, eos_id, on_tokens
        self.row_passes = 0  # sum over rows of target passes while active
        self.attempted = [0] * num_draft
        self.accepted = [0] * num_draft
        self.histogram = [0] * (num_draft + 1)
        self.drafted = 0  # drafts verified, all rows

    def emit(self, row: int, tokens: list[int]) -> None:
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
        return torch.tensor([not d for d in self.done], device=device)


def _as_rows(prompt_ids, device) -> list[Tensor]:
    if isinstance(prompt_ids, Tensor):
        if prompt_ids.dim() == 1:
            prompt_ids = prompt_ids[None]
        if prompt_ids.dim() != 2:
            raise ValueError(f"prompt_ids must be (B, T) or a list of 1-D tensors, got shape {tuple(prompt_ids.shape)}")
        rows = list(prompt_ids)
    else:
        rows = [torch.as_tensor(r, dtype=torch.long) for r in prompt_ids]
    if not rows:
        raise ValueError("no prompts given")
    for r in rows:
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
    return [r.to(device=device, dtype=torch.long) for r in rows]


def _pad(rows: Sequence[Tensor]) -> Tensor:
    """Right-pad 1-D rows with token 0 (padding is never committed) -> (B, T_max)."""
    out = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def prefill(model: MTPDecoderModel, state, rows: list[Tensor]) -> Tensor:
    """Run and commit the prompts; return base logits (B, V) at each row's last prompt token."""
    lengths = torch.tensor([len(r) for r in rows], device=rows[0].device)
    logits = model.verify(state, _pad(rows))  # (B, T_max, V)
    model.accept(state, None, lengths)
    return logits[torch.arange(len(rows), device=lengths.device), lengths - 1]


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def generate(model: MTPDecoderModel, prompt_ids, max_new_tokens: int, mode: str = "ar", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, draft_model: MTPDecoderModel | None = None,
             num_draft: int | None = None, eos_id: int | None = None, seed: int | None = None,
             tree=None, tree_budget: int | None = None, on_tokens: TokenCallback | None = None,
             truncate: str | None = None, draft_cost: float | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt.

    prompt_ids: (B, T) LongTensor or a list of 1-D LongTensors of different lengths.
    mode: "ar" plain decoding; "spec" self-speculative (heads 1..num_draft draft, one pass
    verifies); "draft" a separate ``draft_model`` drafts num_draft tokens; "tree" verifies a
    candidate tree (see ``tree.py``). Greedy (temperature 0) output is token-identical to
    "ar"; sampling preserves the "ar" distribution. ``truncate="left"`` drops the oldest
    prompt tokens that do not fit the context instead of raising. ``draft_cost`` (modes "spec"
    and "draft"): choose each step's draft length (up to num_draft) from running acceptance,
    one more draft costing this fraction of a plain step (:mod:`multitoken.decoding.draft_length`).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if draft_cost is not None and mode not in ("spec", "draft"):
        raise ValueError(f"draft_cost (adaptive draft length) applies to modes spec and draft, not {mode!r}")
    device = _device_of(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    sampler = Sampler(temperature, top_k, top_p, generator)
    rows = _fit_context(_as_rows(prompt_ids, device), model, max_new_tokens, truncate)
    for r in rows:
        if int(r.max()) >= model.vocab_size or int(r.min()) < 0:
            raise ValueError(f"prompt token id out of range for vocab_size={model.vocab_size}")
    num_draft = _resolve_num_draft(model, mode, num_draft, draft_model)
    start = time.perf_counter()
    with torch.inference_mode():
        if mode == "tree":
            from multitoken.decoding.tree import tree_decode
            tracker = _Tracker(len(rows), max_new_tokens, eos_id, num_draft, on_tokens)
            stats = GenerationStats()
            tree_decode(model, rows, sampler, tracker, stats, tree=tree, budget=tree_budget)
        else:
            tracker = _Tracker(len(rows), max_new_tokens, eos_id, num_draft, on_tokens)
            stats = GenerationStats()
            policy = DraftLengthPolicy(num_draft, draft_cost) if draft_cost is not None and num_draft else None
            _decode(model, rows, sampler, tracker, stats, mode, num_draft, draft_model, policy)
    stats.wall_s = time.perf_counter() - start
    stats.new_tokens = sum(len(o) for o in tracker.out)
    stats.tau = stats.new_tokens / max(tracker.row_passes, 1)
    stats.acceptance_rates = [a / t if t else 0.0 for a, t in zip(tracker.accepted, tracker.attempted)]
    stats.draft_attempted, stats.draft_accepted = tracker.attempted, tracker.accepted
    stats.drafts_per_step = tracker.drafted / max(tracker.row_passes, 1)
    stats.accepted_histogram = tracker.histogram
    stats.tokens_per_s = stats.new_tokens / stats.wall_s if stats.wall_s > 0 else 0.0
    return GenerationResult(tracker.out, stats)


def _fit_context(rows: list[Tensor], model, max_new: int, truncate: str | None) -> list[Tensor]:
    limit = model.max_seq_len - max_new
    if truncate not in (None, "left"):
        raise ValueError(f"truncate must be None or 'left', got {truncate!r}")
    out = []
    for r in rows:
        if len(r) > limit:
            if truncate != "left" or limit < 1:
                raise ValueError(f"prompt of {len(r)} tokens + max_new_tokens={max_new} exceeds the model's context "
                                 f"of {model.max_seq_len} tokens (use truncate='left' / --truncate left)")
            r = r[-limit:]
        out.append(r)
    return out


def _resolve_num_draft(model, mode: str, num_draft: int | None, draft_model) -> int:
    if mode == "draft":
        if draft_model is None:
            raise ValueError("mode='draft' needs a draft_model")
        if draft_model.vocab_size != model.vocab_size:
            raise ValueError(f"draft model vocab_size={draft_model.vocab_size} differs from the model's "
                             f"{model.vocab_size}")
        num_draft = 4 if num_draft is None else num_draft
    elif mode in ("spec", "tree"):
        heads = model.n_future - 1
        if heads < 1:
            raise ValueError(f"mode={mode!r} needs a model with n_future >= 2 (this one has n_future={model.n_future})")
        num_draft = heads if num_draft is None else num_draft
        if num_draft > heads:
            raise ValueError(f"num_draft={num_draft} is larger than the model's {heads} draft heads")
    else:
        num_draft = 0
    if num_draft < 0 or (mode != "ar" and num_draft < 1):
        raise ValueError(f"num_draft must be >= 1, got {num_draft}")
    return num_draft


def _capacity(rows: list[Tensor], max_new: int, extra: int) -> int:
    return max(len(r) for r in rows) + max_new + extra


def _decode(model, rows, sampler: Sampler, tracker: _Tracker, stats: GenerationStats, mode: str, k: int,
            draft_model, policy: DraftLengthPolicy | None = None) -> None:
    """Plain (k=0), self-speculative or draft-model decoding of a batch; ``policy`` picks
    each step's draft length (at most k) instead of always k."""
    batch, device = len(rows), rows[0].device
    state = model.new_state(batch, _capacity(rows, tracker.max_new, 2 * model.n_future + k + 2))
    last_logits = prefill(model, state, rows)
    stats.forward_passes += 1
    tracker.row_passes += batch
    pending = sampler.choose(last_logits)  # (B,) first new token: emitted, not yet in the cache
    for b in range(batch):
        tracker.emit(b, [int(pending[b])])
    drafter = _DraftModelDrafter(draft_model, rows, state.capacity + k + 2, sampler) if mode == "draft" else None
    while not tracker.all_done:
        active = tracker.active(device)
        # Never draft past what any active row may still emit, nor past the context.
        room = max(tracker.max_new - len(tracker.out[b]) for b in range(batch) if not tracker.done[b])
        want = k if policy is None else policy.choose()
        k_step = max(0, min(want, room - 1, model.max_seq_len - int(state.lengths.max()) - 1))
        if k_step == 0:
            logits = model.verify(state, pending[:, None])  # (B, 1, V)
            accepted = torch.zeros(batch, dtype=torch.long, device=device)
            nxt = sampler.choose(logits[:, 0])
            drafts = pending.new_zeros(batch, 0)
        else:
            if drafter is None:
                pick = (lambda lg, j: lg.argmax(-1)) if sampler.greedy else (lambda lg, j: sampler.choose(lg))
                drafts, draft_logits = model.draft(state, pending, k_step, pick)
            else:
                drafts, draft_logits = drafter.draft(pending, k_step, stats)
            logits = model.verify(state, torch.cat([pending[:, None], drafts], 1))  # (B, k+1, V)
            accepted, nxt = accept_chain(sampler, logits, drafts, draft_logits, draft_is_greedy=False)
        stats.forward_passes += 1
        # Finished rows commit nothing, so their caches stop growing.
        counts = torch.where(active, accepted + 1, torch.zeros_like(accepted))
        model.accept(state, None, counts)
        if drafter is not None:
            drafter.sync(torch.cat([pending[:, None], drafts], 1), counts, drafted=k_step > 0)
        acc, nxt_l, dr = accepted.tolist(), nxt.tolist(), drafts.tolist()
        for b in range(batch):
            if tracker.done[b]:
                continue
            tracker.row_passes += 1
            if k_step:
                tracker.record(b, acc[b], k_step)
                if policy is not None:
                    policy.update(acc[b], k_step)
            tracker.emit(b, dr[b][: acc[b]] + [nxt_l[b]])
        pending = nxt


class _DraftModelDrafter:
    """A separate model drafts k tokens autoregressively; its cache follows the target's.

    The drafter may lag the target by the tokens it has not been fed yet (``unseen``):
    each round feeds them plus the pending token in one padded pass, then one token per pass.
    """

    def __init__(self, draft_model, rows: list[Tensor], capacity: int, sampler: Sampler):
        self.model, self.sampler = draft_model, sampler
        self.state = draft_model.new_state(len(rows), capacity)
        self.unseen = [r.clone() for r in rows]  # committed by the target, not yet fed to the drafter
        self.base = None  # (B,) drafter length before this round's pending token

    def draft(self, pending: Tensor, k: int, stats: GenerationStats) -> tuple[Tensor, Tensor]:
        rows = torch.arange(pending.shape[0], device=pending.device)
        feed = [torch.cat([u, pending[b:b + 1]]) for b, u in enumerate(self.unseen)]
        counts = torch.tensor([len(f) for f in feed], device=pending.device)
        logits = self.model.verify(self.state, _pad(feed))  # (B, W, V)
        self.model.accept(self.state, None, counts)
        self.base = self.state.lengths - 1
        last = logits[rows, counts - 1]
        tokens, all_logits = [], []
        for j in range(k):
            stats.draft_forward_passes += 1
            tokens.append(self.sampler.choose(last))
            all_logits.append(last)
            if j + 1 < k:
                last = self.model.verify(self.state, tokens[-1][:, None])[:, 0]
                self.model.accept(self.state, None, torch.ones_like(counts))
        return torch.stack(tokens, 1), torch.stack(all_logits, 1)

    def sync(self, block: Tensor, counts: Tensor, drafted: bool) -> None:
        """The target committed block[b, :counts[b]] (block = [pending, drafts...])."""
        if not drafted:  # a plain step: the drafter saw none of it
            self.unseen = [torch.cat([u, block[b, : int(c)]]) for b, (u, c) in enumerate(zip(self.unseen, counts))]
            return
        k = block.shape[1] - 1
        # The drafter holds [.., pending, d_1..d_{k-1}]: keep what the target committed.
        self.model.crop(self.state, self.base + torch.clamp(counts, max=k))
        self.unseen = [block[b, min(int(c), k): int(c)] for b, c in enumerate(counts)]
