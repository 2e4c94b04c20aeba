"""The one decoding benchmark: multitoken's decoders (and HF's own, on an HF base) on fixed prompts.

One process, prompts interleaved (every decoder runs prompt i before any runs prompt i+1, so
machine noise hits all alike), greedy, the same ``max_new_tokens``, EOS stops. Decoders:
multitoken plain (``ar``), chain (``spec``, and ``spec_adaptive`` with each step's draft
length chosen at ``draft_cost``), draft-model (``draft``) and tree (``tree``); on a model
that wraps a Hugging Face base (:class:`~multitoken.hf.wrapper.MTPHeadsForCausalLM`) also HF
``generate`` greedy (``hf``) and HF prompt-lookup decoding (``hf_pld``). The first decoder is
the reference: speed-up = its tokens/s ratio, ``identical`` = same tokens as it. τ and
acceptance come from each run's :class:`~multitoken.decoding.GenerationStats`, pooled over
prompts by their counts.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from multitoken.decoding import GenerationStats, generate
from multitoken.errors import MultitokenError
from multitoken.io import write_json

HF_DECODERS = ("hf", "hf_pld")
MULTITOKEN_DECODERS = ("ar", "spec", "spec_adaptive", "draft", "tree")
DECODERS = HF_DECODERS + MULTITOKEN_DECODERS
LABELS = {"hf": "HF generate greedy", "hf_pld": "HF prompt lookup", "ar": "multitoken plain",
          "spec": "multitoken chain", "spec_adaptive": "multitoken chain, adaptive k",
          "draft": "multitoken draft model", "tree": "multitoken tree"}


def hf_base(model):
    """The Hugging Face model a decoder wraps (what the ``hf`` rows run), or None."""
    base = getattr(model, "base", None)
    return base if callable(getattr(base, "generate", None)) else None


def _hf_generate(base, ids: torch.Tensor, max_new: int, eos: int | None, pld: int | None):
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=eos if eos is not None else 0)
    if pld:
        kw["prompt_lookup_num_tokens"] = pld
    start = time.perf_counter()
    out = base.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # no prompt token is padding
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start, None


class _Runner:
    """Runs one decoder on one prompt: (tokens, wall seconds, GenerationStats or None for HF)."""

    def __init__(self, model, eos_id, num_draft, tree, tree_budget, draft_model, draft_cost, pld_tokens):
        self.model, self.eos_id, self.pld_tokens = model, eos_id, pld_tokens
        self.kwargs = {"spec": {"num_draft": num_draft}, "spec_adaptive": {"num_draft": num_draft,
                                                                            "draft_cost": draft_cost},
                       "draft": {"num_draft": num_draft, "draft_model": draft_model},
                       "tree": {"num_draft": num_draft, "tree": tree, "tree_budget": tree_budget}, "ar": {}}

    def __call__(self, decoder: str, ids: torch.Tensor, max_new: int):
        if decoder in HF_DECODERS:
            pld = self.pld_tokens if decoder == "hf_pld" else None
            return _hf_generate(hf_base(self.model), ids, max_new, self.eos_id, pld)
        mode = "spec" if decoder == "spec_adaptive" else decoder
        out = generate(self.model, ids, max_new, mode=mode, eos_id=self.eos_id, **self.kwargs[decoder])
        return out.tokens[0], out.stats.wall_s, out.stats


def _check_decoders(model, decoders: Sequence[str], draft_model, draft_cost) -> list[str]:
    decoders = list(dict.fromkeys(decoders))
    unknown = [d for d in decoders if d not in DECODERS]
    if unknown or not decoders:
        raise MultitokenError(f"unknown decoder {unknown[0] if unknown else None!r}; allowed: {', '.join(DECODERS)}")
    if any(d in HF_DECODERS for d in decoders) and hf_base(model) is None:
        raise MultitokenError("decoders hf and hf_pld need a model that wraps a Hugging Face base (--base)")
    if "draft" in decoders and draft_model is None:
        raise MultitokenError("the draft decoder needs a draft model")
    if "spec_adaptive" in decoders and draft_cost is None:
        raise MultitokenError("the spec_adaptive decoder needs a draft cost")
    return decoders


def bench_decode(model, prompts: Sequence, decoders: Sequence[str] = ("ar", "spec"), max_new_tokens: int = 128,
                 draft_model=None, num_draft: int | None = None, tree=None, tree_budget: int | None = None,
                 draft_cost: float | None = None, pld_tokens: int = 10, eos_id: int | None = None,
                 progress: bool = True, partial: str | Path | None = None) -> dict:
    """Run every decoder on every prompt (interleaved) and pool the results.

    prompts: token-id lists, or (group, token ids) pairs (rows then come per group plus the
    pooled ``"all"`` group). The first decoder is the reference for speed-up and identity
    (put ``"hf"`` first on an HF base). ``partial``: a JSON file rewritten after every prompt,
    so an interrupted run keeps what it finished. Returns ``{"rows", "per_prompt",
    "max_new_tokens", "pld_tokens"}`` (:func:`summarize`).
    """
    from tqdm import tqdm

    decoders = _check_decoders(model, decoders, draft_model, draft_cost)
    if not prompts:
        raise MultitokenError("no prompts to benchmark")
    pairs = [p if isinstance(p, tuple) else (None, p) for p in prompts]
    run = _Runner(model, eos_id, num_draft, tree, tree_budget, draft_model, draft_cost, pld_tokens)
    warm = torch.tensor([list(pairs[0][1])])
    for d in decoders:  # first-call allocations must not count
        run(d, warm, 4)
    per_prompt = []
    for group, ids in tqdm(pairs, desc="bench decode", disable=not progress):
        x = torch.tensor([list(ids)])
        rec, ref = {"group": group, "prompt_tokens": len(ids)}, None
        for d in decoders:
            tokens, wall, stats = run(d, x, max_new_tokens)
            ref = tokens if ref is None else ref
            rec[d] = {"tokens": len(tokens), "wall_s": wall, "identical": tokens == ref,
                      **(_stats_record(stats) if stats is not None else {})}
        per_prompt.append(rec)
        if partial is not None:
            write_json(partial, summarize(per_prompt, decoders, max_new_tokens, pld_tokens))
    return summarize(per_prompt, decoders, max_new_tokens, pld_tokens)


def _stats_record(s: GenerationStats) -> dict:
    """What pooling needs from one run's stats (batch 1: row passes = forward passes)."""
    return {"passes": s.forward_passes, "draft_passes": s.draft_forward_passes, "accepted": s.draft_accepted,
            "attempted": s.draft_attempted, "nodes": s.tree_nodes_per_step * s.forward_passes}


def _pooled_row(recs: list[dict], d: str) -> dict:
    """τ and acceptance of decoder ``d`` pooled over prompts: GenerationStats' definitions on summed counts."""
    tokens, passes = sum(r[d]["tokens"] for r in recs), sum(r[d]["passes"] for r in recs)
    acc = [sum(x) for x in zip(*[r[d]["accepted"] for r in recs])]
    att = [sum(x) for x in zip(*[r[d]["attempted"] for r in recs])]
    row = {"tau": GenerationStats.mean_accept_length(tokens, passes),
           "acceptance_rates": [a / b if b else 0.0 for a, b in zip(acc, att)],
           "forward_passes": passes, "draft_forward_passes": sum(r[d]["draft_passes"] for r in recs)}
    if d == "tree":
        row["tree_nodes_per_step"] = sum(r[d]["nodes"] for r in recs) / max(1, passes)
    return row


def summarize(per_prompt: list[dict], decoders: Sequence[str], max_new_tokens: int, pld_tokens: int) -> dict:
    """Rows per (group, decoder) from per-prompt results, plus the pooled "all" group."""
    groups = sorted({p["group"] for p in per_prompt if p["group"] is not None}) + ["all"]
    ref = decoders[0]
    rows = []
    for group in groups:
        recs = [p for p in per_prompt if group in ("all", p["group"])]
        ref_tps = sum(r[ref]["tokens"] for r in recs) / sum(r[ref]["wall_s"] for r in recs)
        for d in decoders:
            tokens = sum(r[d]["tokens"] for r in recs)
            wall = sum(r[d]["wall_s"] for r in recs)
            row = {"group": group, "mode": d, "decoder": d, "label": LABELS[d], "prompts": len(recs),
                   "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                   "speedup": tokens / wall / ref_tps, "identical": all(r[d]["identical"] for r in recs),
                   "identical_prompts": sum(r[d]["identical"] for r in recs), "max_new_tokens": max_new_tokens}
            if d in MULTITOKEN_DECODERS:
                row.update(_pooled_row(recs, d))
            rows.append(row)
    return {"rows": rows, "per_prompt": per_prompt, "max_new_tokens": max_new_tokens, "pld_tokens": pld_tokens,
            "reference": ref}


def verify_costs(model, widths: Sequence[int], prefix_len: int | None = None) -> list[dict]:
    """verify_cost_by_width through the model's decode path and, where that is a fast one (lean
    forward, oneDNN kernels), also through HF's forward with plain F.linear; every ``relative``
    is then to the HF forward at the smallest width. ``prefix_len``: None = verify_cost_by_width's."""
    from multitoken.measure.verify_cost import verify_cost_by_width

    kw = {} if prefix_len is None else {"prefix_len": prefix_len}
    rows = verify_cost_by_width(model, widths, **kw)
    fast = (getattr(model, "fast_kernels", False), getattr(model, "lean_forward", None))
    if not fast[0] and fast[1] is None:
        return rows
    model.fast_kernels, model.lean_forward = False, None
    try:
        plain = verify_cost_by_width(model, widths, **kw)
    finally:
        model.fast_kernels, model.lean_forward = fast
    one = plain[0]["seconds"]
    for row, p in zip(rows, plain):
        row.update(relative=row["seconds"] / one, hf_seconds=p["seconds"], hf_relative=p["seconds"] / one)
    return rows
