"""Decoding benchmark: plain vs self-speculative vs draft-model (vs tree) on fixed prompts.

All modes run in one process, interleaved prompt by prompt (so machine noise hits every
mode alike), greedy, same max_new_tokens; speed-up = tokens/s of a mode / tokens/s of
plain decoding of the same model; ``identical`` checks every mode's tokens against plain.
"""
from __future__ import annotations

import platform
import time
from typing import Sequence

import torch

from multitoken.decoding.generate import generate


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        cpu = f"{torch.cuda.get_device_name(0)} (host {cpu})"
    return f"{cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def bench_decode(model, prompts: Sequence[Sequence[int]], modes: Sequence[str] = ("ar", "spec"),
                 max_new_tokens: int = 128, draft_model=None, num_draft: int | None = None, tree=None,
                 tree_budget: int | None = None, eos_id: int | None = None, progress: bool = True) -> list[dict]:
    """One row per mode: tau, acceptance per draft position, tokens/s, speed-up, identical."""
    from tqdm import tqdm

    modes = ["ar"] + [m for m in modes if m != "ar"]
    totals = {m: dict(tokens=0, wall=0.0, passes=0, draft_passes=0, acc=None, att=None, nodes=0.0, identical=True)
              for m in modes}
    warm = torch.tensor([list(prompts[0])])
    for m in modes:  # warm-up: first-call allocations must not count
        _run(model, warm, 4, m, draft_model, num_draft, tree, tree_budget, eos_id)
    for prompt in tqdm(prompts, desc="bench decode", disable=not progress):
        ids = torch.tensor([list(prompt)])
        reference = None
        for m in modes:
            out = _run(model, ids, max_new_tokens, m, draft_model, num_draft, tree, tree_budget, eos_id)
            if m == "ar":
                reference = out.tokens
            t = totals[m]
            t["identical"] &= out.tokens == reference
            t["tokens"] += out.stats.new_tokens
            t["wall"] += out.stats.wall_s
            t["passes"] += out.stats.forward_passes
            t["draft_passes"] += out.stats.draft_forward_passes
            t["nodes"] += out.stats.tree_nodes_per_step * out.stats.forward_passes
            # Pool acceptance over prompts by attempts: running (accepted, attempted) sums.
            hist = out.stats.accepted_histogram
            if hist:
                att = [sum(hist[i:]) for i in range(len(hist) - 1)]
                acc = [sum(hist[i + 1:]) for i in range(len(hist) - 1)]
                t["acc"] = acc if t["acc"] is None else [a + b for a, b in zip(t["acc"], acc)]
                t["att"] = att if t["att"] is None else [a + b for a, b in zip(t["att"], att)]
    base_tps = totals["ar"]["tokens"] / totals["ar"]["wall"]
    rows = []
    for m in modes:
        t = totals[m]
        tps = t["tokens"] / t["wall"]
        rows.append({
            "mode": m,
            "tau": t["tokens"] / max(t["passes"], 1),
            "acceptance_rates": [a / b if b else 0.0 for a, b in zip(t["acc"] or [], t["att"] or [])],
            "tokens_per_s": tps,
            "speedup": tps / base_tps,
            "identical": bool(t["identical"]),
            "forward_passes": t["passes"],
            "draft_forward_passes": t["draft_passes"],
            "new_tokens": t["tokens"],
            "wall_s": t["wall"],
            "prompts": len(prompts),
            "max_new_tokens": max_new_tokens,
            **({"tree_nodes_per_step": t["nodes"] / max(t["passes"], 1)} if m == "tree" else {}),
        })
    return rows


def _run(model, ids, max_new, mode, draft_model, num_draft, tree, tree_budget, eos_id):
    kwargs = dict(mode=mode, eos_id=eos_id)
    if mode == "draft":
        kwargs.update(draft_model=draft_model, num_draft=num_draft)
    elif mode in ("spec", "tree"):
        kwargs.update(num_draft=num_draft)
    if mode == "tree":
        kwargs.update(tree=tree, tree_budget=tree_budget)
    return generate(model, ids, max_new, **kwargs)


def markdown_table(rows: list[dict], title: str = "decode") -> str:
    lines = [f"### {title}", "", f"{machine_description()}; {time.strftime('%Y-%m-%d')}", "",
             "| mode | τ | acceptance per draft position | tokens/s | speed-up | identical |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        acc = " / ".join(f"{a:.2f}" for a in r["acceptance_rates"]) or "–"
        lines.append(f"| {r['mode']} | {r['tau']:.2f} | {acc} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def verify_cost_table(costs: list[dict]) -> str:
    """Markdown rows of one verify pass's cost by block width (what a tree budget costs)."""
    lines = ["", "Verify-pass cost by block width (1 = a plain decoding step; a tree of N nodes is width N+1):", "",
             "| width | ms per pass | × width 1 |", "|---|---|---|"]
    for c in costs:
        lines.append(f"| {c['width']} | {1000 * c['seconds']:.2f} | {c['relative']:.2f} |")
    return "\n".join(lines) + "\n"
