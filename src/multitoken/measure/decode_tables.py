"""Text of decoding results: the benchmark's markdown table and the demo's console table."""
from __future__ import annotations

from multitoken.measure.decode import DECODERS, MASKED, decoder_label
from multitoken.measure.machine import describe_machine


def _rates(rates) -> str:
    return " / ".join(f"{a:.2f}" for a in rates or []) or "–"


def _setup_line(result: dict) -> str:
    parts = [describe_machine(result.get("machine"))]
    if result.get("decode_path"):
        parts.append(result["decode_path"]["text"])
    parts += [str(result.get("date", ""))[:10], f"greedy, {result['max_new_tokens']} new tokens"
              + (" max (EOS stops)" if result.get("eos_id") is not None else "")]
    if result.get("chat"):
        parts.append("chat template applied")
    if result.get("batch_size", 1) > 1:
        ref = _reference_label(result)
        parts.append(f"batch size {result['batch_size']} (prompts of one group decoded together; tokens/s = all "
                     f"rows' new tokens / wall time); identical = each row equals the prompt's own single-prompt "
                     f"{ref} output")
    if any(r["decoder"] == "hf_pld" for r in result["rows"]):
        parts.append(f"prompt lookup with prompt_lookup_num_tokens={result['pld_tokens']}")
    return "; ".join(p for p in parts if p)


def verify_cost_markdown(verify: list[dict]) -> list[str]:
    """Rows of one verify pass's cost by block width (what a tree budget costs)."""
    lines = ["Verify-pass cost by block width (one forward over W new tokens after a prefix; 1 = a plain "
             "decoding step; a tree of N nodes is width N+1):", ""]
    if "hf_seconds" in verify[0]:
        lines += ["× is relative to one token through HF's forward with F.linear (one HF greedy step). The "
                  "multitoken path is timed as greedy decoding runs it (with the vocabulary screen where the "
                  "CPU has one, `multitoken.hf.vocab_screen`).", "",
                  "| W | HF forward, F.linear ms (median) | × | multitoken decode path ms (median) | × |",
                  "|---|---|---|---|---|"]
        lines += [f"| {v['width']} | {1000 * v['hf_seconds']:.2f} | {v['hf_relative']:.2f} | "
                  f"{1000 * v['seconds']:.2f} | {v['relative']:.2f} |" for v in verify]
    else:
        lines += ["| W | ms per pass (median) | × W=1 |", "|---|---|---|"]
        lines += [f"| {v['width']} | {1000 * v['seconds']:.2f} | {v['relative']:.2f} |" for v in verify]
    return lines + [""]


def _reference_label(result: dict) -> str:
    ref = result.get("reference")
    return decoder_label(ref) if ref and ref.removesuffix(MASKED) in DECODERS else "the first row"


def decode_markdown(result: dict, title: str) -> str:
    """A :func:`~multitoken.measure.decode_run.run_decode_bench` result as markdown: machine and
    settings, one table per prompt group (one table when prompts have no groups), verify cost."""
    reference = _reference_label(result)
    lines = [f"### {title}", "", _setup_line(result), ""]
    groups = list(dict.fromkeys(r["group"] for r in result["rows"]))
    for group in groups:
        rows = [r for r in result["rows"] if r["group"] == group]
        if len(groups) > 1:
            lines += [f"**{group}** ({rows[0]['prompts']} prompts)", ""]
        lines += [f"| mode | decoder | τ | acceptance per draft position | tokens/s | speed-up vs {reference} | identical |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            tau = f"{r['tau']:.2f}" if "tau" in r else "–"
            ident = "yes" if r["identical"] else f"NO ({r['identical_prompts']}/{r['prompts']})"
            rates = _rates(r.get("acceptance_rates"))
            if r.get("lookup_tokens"):
                rates += f" (prompt lookup's own nodes: {r['lookup_tokens'] / max(r['new_tokens'], 1):.0%} of tokens)"
            lines.append(f"| {r['mode']} | {r['label']} | {tau} | {rates} | "
                         f"{r['tokens_per_s']:.2f} | {r['speedup']:.2f}× | {ident} |")
        lines.append("")
    if result.get("verify_cost"):
        lines += verify_cost_markdown(result["verify_cost"])
    return "\n".join(lines)


def demo_table(rows: list[tuple[str, object, float | None, bool | None]]) -> str:
    """The demo's console table. rows: (name, GenerationResult, reference tokens/s, identical
    to plain or None where that does not apply, e.g. sampling)."""
    lines = [f"{'decoder':<22}{'tokens':>7}{'passes':>8}{'tau':>7}{'tok/s':>9}{'speed-up':>10}  identical  "
             "acceptance per head"]
    for name, r, ref_tps, same in rows:
        st = r.stats
        acc = " ".join(f"{a:.2f}" for a in st.acceptance_rates) or "-"
        shown = {True: "yes", False: "NO", None: "n/a"}[same]
        lines.append(f"{name:<22}{st.new_tokens:>7}{st.forward_passes:>8}{st.tau:>7.2f}{st.tokens_per_s:>9.1f}"
                     f"{st.tokens_per_s / ref_tps:>9.2f}x  {shown:<9}  {acc}")
    return "\n".join(lines)
