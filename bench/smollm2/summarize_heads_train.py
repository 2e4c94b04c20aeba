"""Summarise a `multitoken heads train` run (metrics.jsonl + train_summary.json) as markdown + JSON.

Run: .venv/bin/python bench/smollm2/summarize_heads_train.py runs/smollm2-heads bench/smollm2/heads_train ["note"]
Writes <prefix>.md and <prefix>.json (validation rows, a thinned train curve, the run summary); an
optional third argument is appended to the markdown as a note.
"""
import json
import sys
from pathlib import Path


def main(run: str, prefix: str, note: str = "") -> None:
    run_dir = Path(run)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "train_summary.json").read_text())
    val = [r for r in rows if r.get("split") == "val"]
    train = [r for r in rows if r.get("split") != "val"]
    keep = train[:: max(1, len(train) // 20)] + train[-1:]
    cfg = summary["config"]
    lines = [
        "### Head training on frozen SmolLM2-135M-Instruct (CPU)", "",
        f"`{cfg['head_type']}` heads, n_future={cfg['n_future']} ({cfg['n_future'] - 1} draft heads), "
        f"targets `{cfg['targets']}`, draft vocabulary {cfg['draft_vocab']} ids "
        f"(covering {summary['draft_vocab_coverage']:.2%} of the cached training rows' base-greedy tokens), "
        f"AdamW lr {cfg['lr']} cosine, batch {cfg['batch_size']}×{summary['seq_len']} tokens.", "",
        f"- hidden cache: {summary['cache_tokens']} tokens of the frozen base "
        f"({'reused' if summary['cache_reused'] else 'built'} in {summary['cache_s']:.0f} s; "
        f"{summary['train_rows']} train / {summary['val_rows']} validation rows of {summary['seq_len']})",
        f"- training: {summary['steps']} steps, {summary['tokens']} tokens = {summary['epochs']:.1f} epochs "
        f"over {summary['unique_train_tokens']} unique tokens, {summary['wall_s'] / 60:.1f} min wall "
        f"({summary['status']})", "",
        "Validation (held-out cache rows; accuracy = top-1 agreement of head i with its target, "
        "head 0 = the base itself; expected τ = 1 + Σ_j Π_{i≤j} acc_i):", "",
        "| step | tokens | val loss (draft heads) | " + " | ".join(f"head {i} acc" for i in range(1, cfg["n_future"]))
        + " | expected τ |",
        "|---|---|---|" + "---|" * (cfg["n_future"] - 1) + "---|"]
    for r in val:
        lines.append(f"| {r['step']} | {r['tokens']} | {r['loss']:.3f} | "
                     + " | ".join(f"{a:.1%}" for a in r["head_accuracy"][1:]) + f" | {r['expected_tau']:.2f} |")
    if summary.get("tree"):
        t = summary["tree"]
        lines += ["", f"Static tree saved with the heads ({len(t['paths'])} nodes, from validation top-k hits, "
                  f"expected τ {t['expected_tau']:.2f}): `{json.dumps(t['paths'])}`"]
    if note:
        lines += ["", note]
    lines.append("")
    Path(prefix + ".md").write_text("\n".join(lines))
    Path(prefix + ".json").write_text(json.dumps({"summary": summary, "val": val, "train_curve": keep},
                                                 indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:4])
