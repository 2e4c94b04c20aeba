"""Logit warping, sampling and the lossless speculative acceptance rule.

Both the target distribution p and the draft distribution q go through the same
``warp`` (temperature, top-k, top-p), so acceptance compares like with like.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import MultitokenError


@dataclass(frozen=True)
class Sampler:
    """How tokens are chosen. temperature == 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None

    def __post_init__(self):
        # `not x >= 0` (rather than `x < 0`) so NaN is refused too.
        if not is_finite_number(self.temperature) or not self.temperature >= 0:
            raise MultitokenError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, numbers.Integral) or isinstance(self.top_k, bool)
                                       or self.top_k < 1):
            raise MultitokenError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not (is_finite_number(self.top_p) and 0 < self.top_p <= 1):
            raise MultitokenError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        """Warped distribution (..., V) from raw logits (..., V)."""
        logits = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        if self.top_p is not None and self.top_p < 1:
            sorted_p, order = probs.sort(-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = sorted_p.cumsum(-1) - sorted_p >= self.top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def sample_probs(self, probs: Tensor) -> Tensor:
        """One token per row of probs (B, V) -> (B,)."""
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)

    def choose(self, logits: Tensor) -> Tensor:
        """Token per row from raw logits (B, V) -> (B,)."""
        return logits.argmax(-1) if self.greedy else self.sample_probs(self.probs(logits))

    def uniform(self, shape, device) -> Tensor:
        return torch.rand(shape, generator=self.generator, device=device)


def is_finite_number(x) -> bool:
    """A real number that is neither NaN nor infinite (bools are not numbers here)."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def accept_chain(sampler: Sampler, target_logits: Tensor, drafts: Tensor, draft_logits: Tensor | None,
                 draft_is_greedy: bool) -> tuple[Tensor, Tensor]:
    """Longest accepted prefix of each row's drafts, and the token that follows it.

    target_logits: (B, k+1, V) base logits at the block positions [pending, d_1..d_k];
    drafts: (B, k); draft_logits: (B, k, V) raw logits the drafts were chosen from.
    Greedy: accept while the draft equals the base argmax; the next token is the base
    argmax at the first mismatch (or after the last draft). Sampling (lossless): accept
    d_j with probability min(1, p(d_j) / q(d_j)); at the first rejection sample from
    normalize(max(0, p - q)); after k accepts sample from p. q is one-hot when the drafts
    were chosen deterministically (``draft_is_greedy``).
    Returns (accepted (B,) in [0, k], next_token (B,)).
    """
    batch, k = drafts.shape
    rows = torch.arange(batch, device=drafts.device)
    if sampler.greedy:
        base = target_logits.argmax(-1)  # (B, k+1)
        match = (base[:, :k] == drafts).long()
        accepted = match.cumprod(1).sum(1)
        return accepted, base[rows, accepted]
    p = sampler.probs(target_logits)  # (B, k+1, V)
    if draft_is_greedy:
        q = torch.zeros_like(p[:, :k]).scatter_(-1, drafts[..., None], 1.0)
    else:
        q = sampler.probs(draft_logits)
    p_d = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)  # (B, k)
    q_d = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = sampler.uniform((batch, k), drafts.device)
    ok = (u * q_d <= p_d).long()  # u < p/q without dividing by a zero q
    accepted = ok.cumprod(1).sum(1)
    # Distribution of the token after the accepted prefix: residual at a rejection, p after k accepts.
    p_next = p[rows, accepted]  # (B, V)
    q_pad = torch.cat([q, torch.zeros_like(q[:, :1])], 1)
    residual = (p_next - q_pad[rows, accepted]).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    # mass == 0 only if p == q exactly, where rejection has probability 0: fall back to p.
    residual = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
    return accepted, sampler.sample_probs(residual)
