"""Decoding benchmark on a Hugging Face base with MTP heads, side by side with HF's own decoders.

One process, prompts interleaved (every decoder runs prompt i before any runs prompt i+1, so
machine noise hits all alike), greedy, the same ``max_new_tokens``, EOS stops. Rows, per prompt
group (code / prose): HF ``generate`` greedy (the reference for speed-up and identity), HF
prompt-lookup decoding (``prompt_lookup_num_tokens``), multitoken plain (``ar``), chain
(``spec``) and tree decoding through :class:`~multitoken.hf.wrapper.MTPHeadsForCausalLM`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import torch

from multitoken.decoding.generate import generate

DECODERS = ("hf", "hf_pld", "ar", "spec", "spec_adaptive", "tree")
MULTITOKEN_DECODERS = ("ar", "spec", "spec_adaptive", "tree")
LABELS = {"hf": "HF generate greedy", "hf_pld": "HF prompt lookup", "ar": "multitoken plain",
          "spec": "multitoken chain", "spec_adaptive": "multitoken chain, adaptive k", "tree": "multitoken tree"}
def _hf_generate(base, ids: torch.Tensor, max_new: int, eos: int | None, pld: int | None):
    kw = dict(max_new_tokens=max_new, do_sample=False, pad_token_id=eos if eos is not None else 0)
    if pld:
        kw["prompt_lookup_num_tokens"] = pld
    start = time.perf_counter()
    out = base.generate(ids, attention_mask=torch.ones_like(ids), **kw)  # no prompt token is padding
    return out[0, ids.shape[1]:].tolist(), time.perf_counter() - start


def bench_hf_decode(model, tokenizer, prompts: Sequence[tuple[str, Sequence[int]]], max_new_tokens: int = 128,
                    decoders: Sequence[str] = DECODERS, num_draft: int | None = None, tree=None,
                    pld_tokens: int = 10, progress: bool = True, partial: str | Path | None = None,
                    draft_cost: float = 0.1) -> dict:
    """prompts: (group, token ids) pairs. Returns {"rows": [...], "per_prompt": [...]}: one row per
    (group, decoder) plus an "all" group; speed-up and identity are against HF greedy.
    ``spec_adaptive`` is the chain with each step's draft length chosen at ``draft_cost``."""
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    decoders = ["hf"] + [d for d in decoders if d != "hf"]
    warm = torch.tensor([list(prompts[0][1])])
    for d in decoders:  # first-call allocations must not count
        _run(model, d, warm, 4, eos, num_draft, tree, pld_tokens, draft_cost)
    per_prompt = []
    for group, ids in tqdm(prompts, desc="bench hf decode", disable=not progress):
        x = torch.tensor([list(ids)])
        rec = {"group": group, "prompt_tokens": len(ids)}
        ref = None
        for d in decoders:
            tokens, wall, stats = _run(model, d, x, max_new_tokens, eos, num_draft, tree, pld_tokens, draft_cost)
            ref = tokens if d == "hf" else ref
            rec[d] = {"tokens": len(tokens), "wall_s": wall, "identical": tokens == ref, **stats}
        per_prompt.append(rec)
        if partial is not None:  # an interrupted run keeps the prompts it finished
            Path(partial).write_text(json.dumps(summarize(per_prompt, decoders, max_new_tokens, pld_tokens)))
    return summarize(per_prompt, decoders, max_new_tokens, pld_tokens)


def summarize(per_prompt: list[dict], decoders: Sequence[str], max_new_tokens: int, pld_tokens: int) -> dict:
    """Rows per (group, decoder) from per-prompt results, plus the pooled "all" group."""
    rows = []
    for group in sorted({p["group"] for p in per_prompt}) + ["all"]:
        recs = [p for p in per_prompt if group in ("all", p["group"])]
        hf_tps = sum(r["hf"]["tokens"] for r in recs) / sum(r["hf"]["wall_s"] for r in recs)
        for d in decoders:
            tokens = sum(r[d]["tokens"] for r in recs)
            wall = sum(r[d]["wall_s"] for r in recs)
            row = {"group": group, "decoder": d, "label": LABELS[d], "prompts": len(recs),
                   "new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
                   "speedup": tokens / wall / hf_tps, "identical": all(r[d]["identical"] for r in recs),
                   "identical_prompts": sum(r[d]["identical"] for r in recs)}
            if d in MULTITOKEN_DECODERS:
                passes = sum(r[d]["passes"] for r in recs)
                # tokens per decode pass: the prefill pass emits each prompt's first token
                row["tau"] = (tokens - len(recs)) / max(1, passes - len(recs))
                acc = [sum(x) for x in zip(*[r[d]["accepted"] for r in recs])] if d != "ar" else []
                att = [sum(x) for x in zip(*[r[d]["attempted"] for r in recs])] if d != "ar" else []
                row["acceptance_rates"] = [a / b if b else 0.0 for a, b in zip(acc, att)]
                if d == "tree":
                    row["tree_nodes_per_step"] = sum(r[d]["nodes"] for r in recs) / max(1, passes)
            rows.append(row)
    return {"rows": rows, "per_prompt": per_prompt, "max_new_tokens": max_new_tokens, "pld_tokens": pld_tokens}


def _run(model, decoder: str, x: torch.Tensor, max_new: int, eos, num_draft, tree, pld: int, draft_cost: float):
    if decoder in ("hf", "hf_pld"):
        tokens, wall = _hf_generate(model.base, x, max_new, eos, pld if decoder == "hf_pld" else None)
        return tokens, wall, {}
    mode = "spec" if decoder == "spec_adaptive" else decoder
    kw = {"num_draft": num_draft} if mode in ("spec", "tree") else {}
    if decoder == "tree":
        kw["tree"] = tree
    if decoder == "spec_adaptive":
        kw["draft_cost"] = draft_cost
    out = generate(model, x, max_new, mode=mode, eos_id=eos, **kw)
    s = out.stats
    return out.tokens[0], s.wall_s, {"passes": s.forward_passes, "accepted": s.draft_accepted,
                                     "attempted": s.draft_attempted, "nodes": s.tree_nodes_per_step * s.forward_passes}


def markdown(result: dict, title: str, machine: str, verify: list[dict] | None = None) -> str:
    lines = [f"### {title}", "", f"{machine}; {time.strftime('%Y-%m-%d')}; greedy, "
             f"{result['max_new_tokens']} new tokens max (EOS stops), chat template applied; "
             f"prompt lookup with prompt_lookup_num_tokens={result['pld_tokens']}", ""]
    for group in dict.fromkeys(r["group"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["group"] == group]
        lines += [f"**{group}** ({rows[0]['prompts']} prompts)", "",
                  "| decoder | τ | acceptance per draft position | tokens/s | speed-up vs HF greedy | identical |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            tau = f"{r['tau']:.2f}" if "tau" in r else "–"
            acc = " / ".join(f"{a:.2f}" for a in r.get("acceptance_rates", [])) or "–"
            ident = "yes" if r["identical"] else f"no ({r['identical_prompts']}/{r['prompts']})"
            lines.append(f"| {r['label']} | {tau} | {acc} | {r['tokens_per_s']:.2f} | {r['speedup']:.2f}× | {ident} |")
        lines.append("")
    if verify:
        both = "hf_seconds" in verify[0]
        lines += ["Verify cost (one forward over W new tokens on a 128-token prefix, base + lm_head; "
                  "× = relative to one token through HF's forward with F.linear, i.e. one HF greedy step):", ""]
        if both:
            lines += ["| W | HF forward, F.linear s (median) | × | multitoken decode path s (median) | × |",
                      "|---|---|---|---|---|"]
            lines += [f"| {v['width']} | {v['hf_seconds']:.3f} | {v['hf_relative']:.2f} | "
                      f"{v['seconds']:.3f} | {v['relative']:.2f} |" for v in verify]
        else:
            lines += ["| W | seconds (median) | × W=1 |", "|---|---|---|"]
            lines += [f"| {v['width']} | {v['seconds']:.3f} | {v['relative']:.2f} |" for v in verify]
        lines.append("")
    return "\n".join(lines)


def verify_costs(model, widths: Sequence[int] = (1, 2, 4, 8, 16)) -> list[dict]:
    """verify_cost_by_width through the model's decode path and, where that is a fast one (lean
    forward, oneDNN kernels), also through HF's forward with plain F.linear; every ``relative``
    is to the HF forward at the smallest width."""
    from multitoken.decoding.tree import verify_cost_by_width
    rows = verify_cost_by_width(model, widths)
    fast = (getattr(model, "fast_kernels", False), getattr(model, "lean_forward", None))
    if not fast[0] and fast[1] is None:
        return rows
    model.fast_kernels, model.lean_forward = False, None
    try:
        plain = verify_cost_by_width(model, widths)
    finally:
        model.fast_kernels, model.lean_forward = fast
    one = plain[0]["seconds"]
    for row, p in zip(rows, plain):
        row.update(relative=row["seconds"] / one, hf_seconds=p["seconds"], hf_relative=p["seconds"] / one)
    return rows
