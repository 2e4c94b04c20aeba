"""Tree tuning: measure the heads' top-k acceptance along greedy decoding and build the
static tree that maximises the expected accepted length (Medusa's recipe)."""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from multitoken.decoding.batch import as_rows, capacity, device_of, fit_context, prefill
from multitoken.decoding.tree_presets import build_tree
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel


@torch.no_grad()
def measure_topk_acceptance(model: MTPDecoderModel, prompts, num_draft: int | None = None, top_k: int = 8,
                            max_new_tokens: int = 64, batch_size: int = 16) -> Tensor:
    """P(base greedy token == rank-r candidate of head j), measured along greedy decoding.

    For every prompt, decode ``max_new_tokens`` greedily (``batch_size`` prompts at a time;
    prompts too long for the context lose their oldest tokens); at each step record heads
    1..k's top_k candidates (drafted with argmax picks, as tree decoding does) and compare
    head j's candidates with the greedy token j places after the pending token.
    Returns acc (k, top_k) float64; acc[j-1, r] for head j, rank r.
    """
    heads = model.n_future - 1
    k = heads if num_draft is None else num_draft
    if not 1 <= k <= heads:
        raise MultitokenError(f"num_draft must be in [1, {heads}] for this model, got {k}")
    if not 1 <= top_k <= model.vocab_size:
        raise MultitokenError(f"top_k must be in [1, vocab_size={model.vocab_size}], got {top_k}")
    if max_new_tokens < 2:
        raise MultitokenError(f"max_new_tokens must be >= 2 to measure acceptance, got {max_new_tokens}")
    if batch_size < 1:
        raise MultitokenError(f"batch_size must be >= 1, got {batch_size}")
    device = device_of(model)
    rows = fit_context(as_rows(prompts, device), model, max_new_tokens, "left")
    hits = torch.zeros(k, top_k, dtype=torch.float64)
    totals = torch.zeros(k, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            state = model.new_state(len(chunk), capacity(chunk, max_new_tokens, 2))
            pending = prefill(model, state, chunk).argmax(-1)
            generated, cands = [pending], []
            for _ in range(max_new_tokens - 1):
                _, draft_logits = model.draft(state, pending, k, lambda lg, j: lg.argmax(-1))
                cands.append(draft_logits.topk(top_k, dim=-1).indices)  # (B, k, K)
                pending = model.verify(state, pending[:, None])[:, 0].argmax(-1)
                model.accept(state, None, torch.ones_like(pending))
                generated.append(pending)
            gen = torch.stack(generated, 1)  # (B, N): gen[:, s] is the pending token at step s
            for s, cand in enumerate(cands):
                for j in range(1, min(k, gen.shape[1] - 1 - s) + 1):  # head j at step s guesses gen[:, s + j]
                    hits[j - 1] += (cand[:, j - 1] == gen[:, s + j, None]).sum(0).double().cpu()
                    totals[j - 1] += gen.shape[0]
    return hits / totals.clamp(min=1)[:, None]


def tuning_top_k(budget: int, top_k: int | None, vocab_size: int) -> int:
    """Candidates to measure per head: ``top_k``, by default min(budget, 10), never past the vocabulary."""
    return min(top_k or min(budget, 10), vocab_size)


def tune_tree(model: MTPDecoderModel, prompts, budget: int, num_draft: int | None = None, top_k: int | None = None,
              max_new_tokens: int = 64, batch_size: int = 16) -> list[list[int]]:
    """Measure per-head top-k acceptance on ``prompts`` and build the static tree of at most
    ``budget`` nodes that maximises the expected accepted length (Medusa's recipe).
    top_k defaults to min(budget, 10). For the table as well, call
    :func:`measure_topk_acceptance` and :func:`build_tree` yourself."""
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
        raise MultitokenError(f"tree budget must be an integer >= 1, got {budget!r}")
    top_k = tuning_top_k(budget, top_k, model.vocab_size)
    acc = measure_topk_acceptance(model, prompts, num_draft, top_k, max_new_tokens, batch_size)
    return build_tree(acc, budget)
