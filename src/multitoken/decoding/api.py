"""The public entry of decoding: :func:`generate` (plain, self-speculative, draft-model and
tree-verified decoding, batched, greedy or lossless sampling).

Models are reached only through the protocol in :mod:`multitoken.model.protocol`
(new_state / verify / accept / crop / draft), so the same loop drives the native model and
wrapped HF models. :func:`generate` checks its arguments, picks the mode's step
(:class:`~multitoken.decoding.chain.ChainStep` or :class:`~multitoken.decoding.tree_verify.TreeStep`)
and runs :func:`~multitoken.decoding.loop.decode_loop`: draft -> verify -> accept -> commit
(rollback = commit only the accepted prefix).
"""
from __future__ import annotations

import time

import torch

from multitoken.decoding.batch import TokenCallback, Tracker, as_rows, device_of, fit_context
from multitoken.decoding.chain import ChainStep
from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.decoding.loop import decode_loop
from multitoken.decoding.sampling import Sampler
from multitoken.decoding.stats import GenerationResult, GenerationStats
from multitoken.decoding.tree_verify import TreeStep
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel

MODES = ("ar", "spec", "draft", "tree")


def generate(model: MTPDecoderModel, prompt_ids, max_new_tokens: int, mode: str = "ar", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, draft_model: MTPDecoderModel | None = None,
             num_draft: int | None = None, eos_id: int | None = None, seed: int | None = None,
             tree=None, tree_budget: int | None = None, on_tokens: TokenCallback | None = None,
             truncate: str | None = None, draft_cost: float | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt.

    prompt_ids: (B, T) LongTensor or a list of 1-D LongTensors of different lengths.
    mode: "ar" plain decoding; "spec" self-speculative (heads 1..num_draft draft, one pass
    verifies); "draft" a separate ``draft_model`` drafts num_draft tokens; "tree" verifies a
    candidate tree (``tree``: paths, preset, JSON or tree.json; ``tree_budget``: a dynamic tree
    of that many nodes, see :mod:`multitoken.decoding.tree_verify`). Greedy (temperature 0)
    output is token-identical to "ar"; sampling preserves the "ar" distribution.
    ``truncate="left"`` drops the oldest prompt tokens that do not fit the context instead of
    raising. ``draft_cost`` (modes "spec" and "draft"): choose each step's draft length (up to
    num_draft) from running acceptance, one more draft costing this fraction of a plain step
    (:mod:`multitoken.decoding.draft_length`). ``on_tokens(row, tokens)`` is called with each
    row's newly accepted tokens. Bad arguments raise MultitokenError.
    """
    if mode not in MODES:
        raise MultitokenError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if max_new_tokens < 0:
        raise MultitokenError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if draft_cost is not None and mode not in ("spec", "draft"):
        raise MultitokenError(f"draft_cost (adaptive draft length) applies to modes spec and draft, not {mode!r}")
    device = device_of(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    sampler = Sampler(temperature, top_k, top_p, generator)
    rows = fit_context(as_rows(prompt_ids, device), model, max_new_tokens, truncate)
    for r in rows:
        if int(r.max()) >= model.vocab_size or int(r.min()) < 0:
            raise MultitokenError(f"prompt token id out of range for vocab_size={model.vocab_size}")
    num_draft = resolve_num_draft(model, mode, num_draft, draft_model)
    start = time.perf_counter()
    with torch.inference_mode():
        tracker = Tracker(len(rows), max_new_tokens, eos_id, num_draft, on_tokens)
        if mode == "tree":
            stepper = TreeStep(model, sampler, num_draft, tree=tree, budget=tree_budget)
        else:
            policy = DraftLengthPolicy(num_draft, draft_cost) if draft_cost is not None and num_draft else None
            stepper = ChainStep(model, sampler, tracker, num_draft, draft_model if mode == "draft" else None, policy)
        decode_loop(model, rows, sampler, tracker, stepper)
    stats = GenerationStats.from_tracker(tracker, time.perf_counter() - start)
    return GenerationResult(tracker.out, stats)


def resolve_num_draft(model: MTPDecoderModel, mode: str, num_draft: int | None,
                      draft_model: MTPDecoderModel | None) -> int:
    """The draft depth of ``mode`` (0 for "ar"): ``num_draft`` checked against the model's
    draft heads (or the draft model), or its default (all heads; 4 for a draft model)."""
    if mode == "draft":
        if draft_model is None:
            raise MultitokenError("mode='draft' needs a draft_model")
        if draft_model.vocab_size != model.vocab_size:
            raise MultitokenError(f"draft model vocab_size={draft_model.vocab_size} differs from the model's "
                                  f"{model.vocab_size}")
        num_draft = 4 if num_draft is None else num_draft
    elif mode in ("spec", "tree"):
        heads = model.n_future - 1
        if heads < 1:
            raise MultitokenError(f"mode={mode!r} needs a model with n_future >= 2 "
                                  f"(this one has n_future={model.n_future})")
        num_draft = heads if num_draft is None else num_draft
        if num_draft > heads:
            raise MultitokenError(f"num_draft={num_draft} is larger than the model's {heads} draft heads")
    else:
        num_draft = 0
    if num_draft < 0 or (mode != "ar" and num_draft < 1):
        raise MultitokenError(f"num_draft must be >= 1, got {num_draft}")
    return num_draft
