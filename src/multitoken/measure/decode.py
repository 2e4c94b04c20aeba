"""The one decoding benchmark: multitoken's decoders (and HF's own, on an HF base) on fixed prompts.

One process, prompts interleaved (every decoder runs batch i before any runs batch i+1, so
machine noise hits all alike), greedy, the same ``max_new_tokens``, EOS stops. Decoders:
multitoken plain (``ar``), chain (``spec``, and ``spec_adaptive`` with each step's draft
length chosen at ``draft_cost``), draft-model (``draft``), tree (``tree``: the library default,
prompt-lookup chains grafted on where a cost model is on) and the heads' tree alone
(``tree_heads``); on a model
that wraps a Hugging Face base (:class:`~multitoken.hf.wrapper.MTPHeadsForCausalLM`) also HF
``generate`` greedy (``hf``, batched with left padding and an attention mask) and HF
prompt-lookup decoding (``hf_pld``, batch 1 only). A multitoken decoder name with the
``:mask`` suffix runs with finished rows kept in the batch, masked, instead of dropped
(:class:`KeepFinishedRows`): the drop-vs-mask comparison. The first decoder is the reference
for speed-up (its tokens/s ratio); ``identical`` compares each row with the reference's output
for that prompt alone (at batch size 1: the reference's own row). τ and acceptance come from
each run's :class:`~multitoken.decoding.GenerationStats`, pooled by their counts.
"""
from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Sequence

import torch

from multitoken.decoding import GenerationStats, generate
from multitoken.errors import MultitokenError
from multitoken.io import write_json
from multitoken.model.protocol import greedy_verify

HF_DECODERS = ("hf", "hf_pld")
MULTITOKEN_DECODERS = ("ar", "spec", "spec_full", "spec_adaptive", "draft", "tree_heads", "tree")
DECODERS = HF_DECODERS + MULTITOKEN_DECODERS
MASKED = ":mask"  # suffix of a multitoken decoder run with finished rows masked, not dropped
LABELS = {"hf": "HF generate greedy", "hf_pld": "HF prompt lookup", "ar": "multitoken plain",
          "spec": "multitoken chain", "spec_full": "multitoken chain, all heads every step",
          "spec_adaptive": "multitoken chain, adaptive k",
          "draft": "multitoken draft model", "tree_heads": "multitoken tree, heads only",
          "tree": "multitoken tree (+ prompt lookup)"}


def decoder_label(decoder: str) -> str:
    """The table label of a decoder name (``:mask`` variants included)."""
    name = decoder.removesuffix(MASKED)
    return LABELS[name] + (", finished rows masked" if decoder.endswith(MASKED) else "")


def hf_base(model):
    """The Hugging Face model a decoder wraps (what the ``hf`` rows run), or None."""
    base = getattr(model, "base", None)
    return base if callable(getattr(base, "generate", None)) else None


class KeepFinishedRows:
    """``model`` seen without the protocol's optional ``select_rows``: the decode loop then keeps
    finished rows in the batch (they commit nothing) instead of dropping them."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name: str):
        if name == "select_rows":
            raise AttributeError(name)
        return getattr(self.model, name)


def hf_generate_rows(base, rows: Sequence[Sequence[int]], max_new: int, eos: int | None, pld: int | None):
    """HF ``generate`` greedy on a batch of prompts, left-padded with an attention mask (HF's way):
    (new tokens per row cut after its first EOS, wall seconds, None)."""
    pad = eos if eos is not None else 0
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)  # 1 = a prompt token (a prompt token equal to pad is still one)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
    if pld:
        kw["prompt_lookup_num_tokens"] = pld
    start = time.perf_counter()
    out = base.generate(ids, attention_mask=mask, **kw)
    wall = time.perf_counter() - start
    new = out[:, width:].tolist()  # (B, new): finished rows are padded after their EOS
    return [row[: row.index(eos) + 1] if eos is not None and eos in row else row for row in new], wall, None


class _Runner:
    """Runs one decoder on a batch of prompts: (tokens per row, wall seconds, GenerationStats or None for HF)."""

    def __init__(self, model, eos_id, num_draft, tree, tree_budget, draft_model, draft_cost, pld_tokens):
        self.model, self.masked, self.eos_id, self.pld_tokens = model, KeepFinishedRows(model), eos_id, pld_tokens
        self.kwargs = {"spec": {"num_draft": num_draft}, "spec_full": {"num_draft": num_draft, "cost_model": "off"},
                       "spec_adaptive": {"num_draft": num_draft, "draft_cost": draft_cost},
                       "draft": {"num_draft": num_draft, "draft_model": draft_model},
                       "tree": {"num_draft": num_draft, "tree": tree, "tree_budget": tree_budget}, "ar": {}}
        self.kwargs["tree_heads"] = {**self.kwargs["tree"], "prompt_lookup": 0}

    def __call__(self, decoder: str, rows: Sequence[Sequence[int]], max_new: int):
        name = decoder.removesuffix(MASKED)
        if name in HF_DECODERS:
            pld = self.pld_tokens if name == "hf_pld" else None
            return hf_generate_rows(hf_base(self.model), rows, max_new, self.eos_id, pld)
        model = self.masked if decoder.endswith(MASKED) else self.model
        mode = next((m for m in ("spec", "tree") if name.startswith(m)), name)
        out = generate(model, [torch.tensor(list(r), dtype=torch.long) for r in rows], max_new, mode=mode,
                       eos_id=self.eos_id, **self.kwargs[name])
        return out.tokens, out.stats.wall_s, out.stats


def _check_decoders(model, decoders: Sequence[str], draft_model, draft_cost, batch_size: int) -> list[str]:
    decoders = list(dict.fromkeys(decoders))
    names = [d.removesuffix(MASKED) for d in decoders]
    unknown = [d for d, n in zip(decoders, names) if n not in DECODERS or (d.endswith(MASKED) and n in HF_DECODERS)]
    if unknown or not decoders:
        raise MultitokenError(f"unknown decoder {unknown[0] if unknown else None!r}; allowed: {', '.join(DECODERS)} "
                              f"(multitoken ones also with {MASKED})")
    if any(n in HF_DECODERS for n in names) and hf_base(model) is None:
        raise MultitokenError("decoders hf and hf_pld need a model that wraps a Hugging Face base (--base)")
    if "hf_pld" in names and batch_size > 1:
        raise MultitokenError("HF prompt lookup (hf_pld) decodes one prompt at a time: use --batch-size 1")
    if "draft" in names and draft_model is None:
        raise MultitokenError("the draft decoder needs a draft model")
    if "spec_adaptive" in names and draft_cost is None:
        raise MultitokenError("the spec_adaptive decoder needs a draft cost")
    if batch_size < 1:
        raise MultitokenError(f"batch size must be >= 1, got {batch_size}")
    return decoders


def make_batches(pairs: list[tuple], batch_size: int) -> list[tuple]:
    """(group, [token ids, ...]) batches of up to ``batch_size`` consecutive prompts of one group,
    groups taking turns (an interrupted run covers every group)."""
    by_group: dict = {}
    for group, ids in pairs:
        by_group.setdefault(group, []).append(list(ids))
    chunks = [[(g, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)] for g, rows in by_group.items()]
    return [b for turn in itertools.zip_longest(*chunks) for b in turn if b is not None]


def bench_decode(model, prompts: Sequence, decoders: Sequence[str] = ("ar", "spec"), max_new_tokens: int = 128,
                 draft_model=None, num_draft: int | None = None, tree=None, tree_budget: int | None = None,
                 draft_cost: float | None = None, pld_tokens: int = 10, eos_id: int | None = None,
                 batch_size: int = 1, keep_tokens: bool = False, progress: bool = True,
                 partial: str | Path | None = None) -> dict:
    """Run every decoder on every batch of prompts (interleaved) and pool the results.

    prompts: token-id lists, or (group, token ids) pairs (rows then come per group plus the
    pooled ``"all"`` group; a batch holds prompts of one group). The first decoder is the
    reference for speed-up (put ``"hf"`` first on an HF base); at ``batch_size`` > 1 it also runs
    each prompt alone (untimed) as the reference of ``identical``. ``keep_tokens``: per-prompt
    records keep each decoder's token ids (``ids``). ``partial``: a JSON file rewritten after
    every batch, so an interrupted run keeps what it finished. Returns :func:`summarize`'s dict.
    """
    from tqdm import tqdm

    decoders = _check_decoders(model, decoders, draft_model, draft_cost, batch_size)
    if not prompts:
        raise MultitokenError("no prompts to benchmark")
    batches = make_batches([p if isinstance(p, tuple) else (None, p) for p in prompts], batch_size)
    run = _Runner(model, eos_id, num_draft, tree, tree_budget, draft_model, draft_cost, pld_tokens)
    for d in decoders:  # first-call allocations must not count
        run(d, batches[0][1], 4)
    per_prompt, per_batch = [], []
    for group, rows in tqdm(batches, desc="bench decode", disable=not progress):
        refs = None if batch_size == 1 else [run(decoders[0], [r], max_new_tokens)[0][0] for r in rows]
        recs = [{"group": group, "prompt_tokens": len(r), "batch": len(per_batch)} for r in rows]
        batch_rec = {"group": group, "rows": len(rows)}
        for d in decoders:
            tokens, wall, stats = run(d, rows, max_new_tokens)
            refs = tokens if refs is None else refs
            for rec, t, ref in zip(recs, tokens, refs):
                rec[d] = {"tokens": len(t), "identical": t == ref, **({"ids": t} if keep_tokens else {})}
            batch_rec[d] = {"wall_s": wall, **(_stats_record(stats) if stats is not None else {})}
        per_prompt += recs
        per_batch.append(batch_rec)
        if partial is not None:
            write_json(partial, summarize(per_prompt, per_batch, decoders, max_new_tokens, pld_tokens, batch_size))
    return summarize(per_prompt, per_batch, decoders, max_new_tokens, pld_tokens, batch_size)


def _stats_record(s: GenerationStats) -> dict:
    """What pooling needs from one run's stats. Row passes (a pass over B rows counts B) come back
    from τ = tokens / row passes, which is exact after rounding."""
    row_passes = round(s.new_tokens / s.tau) if s.tau else 0
    return {"passes": s.forward_passes, "row_passes": row_passes, "draft_passes": s.draft_forward_passes,
            "accepted": s.draft_accepted, "attempted": s.draft_attempted,
            "nodes": s.tree_nodes_per_step * row_passes, "chosen_by": s.chosen_by, "tree_nodes": s.tree_nodes,
            "lookup_tokens": s.lookup_tokens}


def _pooled_row(batches: list[dict], tokens: int, d: str) -> dict:
    """τ and acceptance of decoder ``d`` pooled over batches: GenerationStats' definitions on summed counts."""
    row_passes = sum(b[d]["row_passes"] for b in batches)
    acc = [sum(x) for x in zip(*[b[d]["accepted"] for b in batches])]
    att = [sum(x) for x in zip(*[b[d]["attempted"] for b in batches])]
    row = {"tau": GenerationStats.mean_accept_length(tokens, row_passes),
           "acceptance_rates": [a / n if n else 0.0 for a, n in zip(acc, att)],
           "forward_passes": sum(b[d]["passes"] for b in batches),
           "draft_forward_passes": sum(b[d]["draft_passes"] for b in batches)}
    if d.removesuffix(MASKED).startswith("tree"):
        row["tree_nodes_per_step"] = sum(b[d]["nodes"] for b in batches) / max(1, row_passes)
        row["tree_nodes"] = sorted({b[d]["tree_nodes"] for b in batches if b[d]["tree_nodes"] is not None})
        row["lookup_tokens"] = sum(b[d]["lookup_tokens"] for b in batches)  # accepted on lookup-only nodes
    row["chosen_by"] = sorted({b[d]["chosen_by"] for b in batches if b[d]["chosen_by"]})  # how k / the tree was set
    return row


def summarize(per_prompt: list[dict], per_batch: list[dict], decoders: Sequence[str], max_new_tokens: int,
              pld_tokens: int, batch_size: int = 1) -> dict:
    """Rows per (group, decoder) from per-prompt tokens and per-batch times, plus the pooled "all" group."""
    groups = sorted({p["group"] for p in per_prompt if p["group"] is not None}) + ["all"]
    ref = decoders[0]
    rows = []
    for group in groups:
        prompts = [p for p in per_prompt if group in ("all", p["group"])]
        batches = [b for b in per_batch if group in ("all", b["group"])]
        ref_tps = sum(p[ref]["tokens"] for p in prompts) / sum(b[ref]["wall_s"] for b in batches)
        for d in decoders:
            tokens = sum(p[d]["tokens"] for p in prompts)
            wall = sum(b[d]["wall_s"] for b in batches)
            row = {"group": group, "mode": d, "decoder": d, "label": decoder_label(d), "prompts": len(prompts),
                   "batch_size": batch_size, "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                   "speedup": tokens / wall / ref_tps, "identical": all(p[d]["identical"] for p in prompts),
                   "identical_prompts": sum(p[d]["identical"] for p in prompts), "max_new_tokens": max_new_tokens}
            if d.removesuffix(MASKED) in MULTITOKEN_DECODERS:
                row.update(_pooled_row(batches, tokens, d))
            rows.append(row)
    return {"rows": rows, "per_prompt": per_prompt, "per_batch": per_batch, "max_new_tokens": max_new_tokens,
            "pld_tokens": pld_tokens, "reference": ref, "batch_size": batch_size}


def verify_costs(model, widths: Sequence[int], prefix_len: int | None = None) -> list[dict]:
    """verify_cost_by_width through the model's decode path, as greedy decoding runs it (inside
    ``greedy_verify``: the vocabulary screen where there is one) and, where that is a fast one
    (lean forward, oneDNN kernels), also through HF's forward with plain F.linear; every
    ``relative`` is then to the HF forward at the smallest width. ``prefix_len``: None =
    verify_cost_by_width's."""
    from multitoken.measure.verify_cost import verify_cost_by_width

    kw = {} if prefix_len is None else {"prefix_len": prefix_len}
    with greedy_verify():
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
