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
from multitoken.decoding.cost import CostModel
from multitoken.decoding.cost_cache import check_cost_model, resolve_cost_model
from multitoken.decoding.defaults import default_tree, lookup_setting, spec_policy
from multitoken.decoding.loop import decode_loop
from multitoken.decoding.sampling import Sampler
from multitoken.decoding.stats import GenerationResult, GenerationStats
from multitoken.decoding.tree_verify import TreeStep
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel, greedy_verify

MODES = ("ar", "spec", "draft", "tree")


def generate(model: MTPDecoderModel, prompt_ids, max_new_tokens: int, mode: str = "ar", temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, draft_model: MTPDecoderModel | None = None,
             num_draft: int | None = None, eos_id: int | None = None, seed: int | None = None,
             tree=None, tree_budget: int | None = None, on_tokens: TokenCallback | None = None,
             truncate: str | None = None, draft_cost: float | None = None,
             cost_model: CostModel | str | None = "auto", prompt_lookup: int | None = None) -> GenerationResult:
    """Generate up to ``max_new_tokens`` per prompt.

    prompt_ids: (B, T) LongTensor or a list of 1-D LongTensors of different lengths.
    mode: "ar" plain decoding; "spec" self-speculative (heads 1..num_draft draft, one pass
    verifies); "draft" a separate ``draft_model`` drafts num_draft tokens; "tree" verifies a
    candidate tree (``tree``: paths, preset, JSON or tree.json; ``tree_budget``: a dynamic tree
    of that many nodes, see :mod:`multitoken.decoding.tree_verify`; ``prompt_lookup``: also
    verify, in the same pass, up to that many tokens copied from where the sequence's last
    n-gram occurred before, see :mod:`multitoken.decoding.lookup`; 0 = off). Greedy (temperature 0)
    output is token-identical to "ar"; sampling preserves the "ar" distribution.
    ``truncate="left"`` drops the oldest prompt tokens that do not fit the context instead of
    raising. Defaults are cost-aware (:mod:`multitoken.decoding.defaults`): mode "spec" picks
    each step's draft length (up to num_draft) for the most expected tokens per second, and
    mode "tree" without ``tree`` / ``tree_budget`` the tree with the most expected tokens per
    verify cost when the model offers a top-k acceptance table, and without ``prompt_lookup``
    lookup chains sized per step by cost; the costs are calibrated once
    per model and machine (:mod:`multitoken.decoding.cost_cache`). ``cost_model``: "auto"
    (that), "off" / None (every step drafts num_draft; the model's saved tree or the default
    preset) or a ready :class:`~multitoken.decoding.cost.CostModel`. ``draft_cost`` (modes
    "spec" and "draft"): the draft length from running acceptance with one more draft costing
    this fraction of a plain step instead (:mod:`multitoken.decoding.draft_length`).
    ``on_tokens(row, tokens)`` is called with each row's newly accepted tokens. The stats say
    what was chosen (``draft_lengths``, ``tree_nodes``, ``chosen_by``, ``prompt_lookup``). Bad arguments raise
    MultitokenError.
    """
    if mode not in MODES:
        raise MultitokenError(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
    if max_new_tokens < 0:
        raise MultitokenError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_mode_arguments(mode, draft_cost=draft_cost, tree=tree, tree_budget=tree_budget, draft_model=draft_model,
                         prompt_lookup=prompt_lookup)
    check_cost_model(cost_model)
    device = device_of(model)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    sampler = Sampler(temperature, top_k, top_p, generator)
    rows = fit_context(as_rows(prompt_ids, device), model, max_new_tokens, truncate)
    context = model.max_seq_len
    if mode == "draft" and draft_model is not None:  # the drafter reads the same positions: both limits hold
        rows = fit_context(rows, draft_model, max_new_tokens, truncate, who="draft model")
        context = min(context, draft_model.max_seq_len)
    for r in rows:
        if int(r.max()) >= model.vocab_size or int(r.min()) < 0:
            raise MultitokenError(f"prompt token id out of range for vocab_size={model.vocab_size}")
    num_draft = resolve_num_draft(model, mode, num_draft, draft_model)
    lookup, lookup_cost = 0, None
    if mode == "tree" and tree is None and tree_budget is None:  # before the clock: may calibrate once
        tree, chosen_by = default_tree(model, num_draft, len(rows), cost_model)
    elif mode == "tree":
        chosen_by = "given tree" if tree is not None else "dynamic"
    if mode == "tree":
        # The cost-aware default tree is also cut, each step, to the depth that pays (TreeStep's depth_cost);
        # the costs it was built on, once resolved, also size the lookup chains.
        depth_cost = resolve_cost_model(model, cost_model) if chosen_by == "cost-aware" else None
        lookup, lookup_cost = lookup_setting(model, prompt_lookup, depth_cost or cost_model)
    else:
        policy, chosen_by = spec_policy(model, num_draft, len(rows), draft_cost,
                                        cost_model if mode == "spec" else "off")
    start = time.perf_counter()
    with torch.inference_mode(), greedy_verify(sampler.greedy):
        tracker = Tracker(len(rows), max_new_tokens, eos_id, num_draft + lookup, on_tokens)
        if mode == "tree":
            stepper = TreeStep(model, sampler, num_draft, tree=tree, budget=tree_budget, lookup=lookup,
                               cost_model=lookup_cost, depth_cost=depth_cost)
        else:
            stepper = ChainStep(model, sampler, tracker, num_draft, draft_model if mode == "draft" else None, policy)
        decode_loop(model, rows, sampler, tracker, stepper, context)
    stats = GenerationStats.from_tracker(tracker, time.perf_counter() - start)
    stats.chosen_by, stats.prompt_lookup = chosen_by, lookup
    if mode == "tree" and stepper.static is not None:
        stats.tree_nodes = stepper.static.width - 1
    return GenerationResult(tracker.out, stats)


# Arguments that only one group of modes reads; given with another mode they would be ignored.
MODE_ARGUMENTS = {"draft_cost": ("spec", "draft"), "tree": ("tree",), "tree_budget": ("tree",),
                  "draft_model": ("draft",), "prompt_lookup": ("tree",)}


def check_mode_arguments(mode: str, as_flags: bool = False, **given) -> None:
    """Refuse an argument of :data:`MODE_ARGUMENTS` given (not None) with a mode that ignores it;
    ``as_flags`` names it as the command-line flag (``--tree-budget``)."""
    for name, value in given.items():
        modes = MODE_ARGUMENTS[name]
        if value is not None and mode not in modes:
            shown = "--" + name.replace("_", "-") if as_flags else name
            raise MultitokenError(f"{shown} applies to mode{'s' if len(modes) > 1 else ''} {' and '.join(modes)}, "
                                  f"not {mode!r}")


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
