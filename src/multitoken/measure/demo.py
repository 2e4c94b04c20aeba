"""What ``multitoken demo`` shows: a real chat model answering a few requests, decoded by HF's own
``generate`` (the reference), multitoken plain, chain and tree decoding through its MTP heads, with
the answer text once and a table of τ, acceptance, tokens/s, speed-up and identity; and, with
``--native``, a small MTP model trained from scratch (:func:`native_demo`)."""
from __future__ import annotations

import torch

from multitoken.decoding import generate, resolve_tree
from multitoken.measure.decode import LABELS, bench_decode
from multitoken.measure.decode_tables import demo_table

# One code and one prose request of the benchmark set (data/bench_requests.jsonl), and a completion one.
DEMO_REQUESTS = ("code-03", "prose-02", "complete-01")
CHAT_DECODERS = ("hf", "ar", "spec", "tree")


def chat_demo(model, tokenizer, request_ids=DEMO_REQUESTS, max_new_tokens: int = 128,
              progress: bool = False) -> tuple[str, bool]:
    """(text to print, every multitoken decoder reproduced HF greedy) for an MTP-headed HF chat model.

    model: :class:`~multitoken.hf.MTPHeadsForCausalLM`; tokenizer: its :class:`~multitoken.hf.HFTokenizer`.
    Runs :func:`~multitoken.measure.decode.bench_decode` (decoders interleaved per request, HF greedy
    first, EOS stops) on the requests ``request_ids`` of :func:`multitoken.data.load_bench_requests`."""
    from multitoken.data import load_bench_requests
    from multitoken.errors import MultitokenError
    from multitoken.hf import chat_ids

    by_id = {r.id: r for r in load_bench_requests()}
    unknown = [i for i in request_ids if i not in by_id]
    if unknown:
        raise MultitokenError(f"unknown request id {unknown[0]!r}; ids look like {', '.join(list(by_id)[:3])}, ...")
    requests = [by_id[i] for i in request_ids]
    prompts = [(r.group, chat_ids(tokenizer.hf, r.prompt)) for r in requests]
    result = bench_decode(model, prompts, CHAT_DECODERS, max_new_tokens, eos_id=tokenizer.eos_id,
                          progress=progress, keep_tokens=True)
    rule = "-" * 72
    parts = []
    for r, rec in zip(requests, result["per_prompt"]):
        parts += [rule, f"user ({r.group}): {r.prompt}", rule, tokenizer.decode(rec["hf"]["ids"]).strip()]
    parts += [rule, _table([row for row in result["rows"] if row["group"] == "all"], model.n_future - 1), ""]
    identical = all(row["identical"] for row in result["rows"])
    parts.append("identical: every multitoken decoder emitted exactly HF greedy's tokens on every request"
                 if identical else "NOT IDENTICAL: a decoder's output differs from HF greedy (a bug: please report)")
    return "\n".join(parts), identical


def _table(rows: list[dict], heads: int) -> str:
    """Console table of the pooled benchmark rows (first row = HF greedy, the reference): τ,
    speed, identity, acceptance at the ``heads`` draft positions and, for the tree, the share of
    the output that prompt lookup's own nodes delivered."""
    head = f"{'decoder':<34}{'tau':>6}{'tok/s':>8}{'speed-up':>10}  identical  acceptance per head"
    lines = [head]
    for r in rows:
        tau = f"{r['tau']:.2f}" if "tau" in r else "-"
        acc = " ".join(f"{a:.2f}" for a in (r.get("acceptance_rates") or [])[:heads]) or "-"
        if r.get("lookup_tokens"):
            acc += f"  (+ {r['lookup_tokens'] / max(r['new_tokens'], 1):.0%} of tokens copied by prompt lookup)"
        lines.append(f"{LABELS[r['decoder']]:<34}{tau:>6}{r['tokens_per_s']:>8.1f}{r['speedup']:>9.2f}x  "
                     f"{'yes' if r['identical'] else 'NO':<9}  {acc}")
    return "\n".join(lines)


DEMO_PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the command line.\"\"\"\n"
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)  # greedy text of a minutes-old byte model degenerates


def native_demo(ckpt, prompt: str = DEMO_PROMPT, max_new_tokens: int = 256) -> tuple[str, bool]:
    """(text to print, every greedy decoder reproduced plain decoding) for a native checkpoint."""
    from multitoken.training import load_model

    model, tokenizer = load_model(ckpt)
    ids = [torch.tensor(tokenizer.encode(prompt))]
    max_new_tokens = min(max_new_tokens, model.max_seq_len - len(ids[0]))
    eos = tokenizer.eos_id
    generate(model, ids, 8)  # warm-up, so first-call allocations are not timed
    plain = generate(model, ids, max_new_tokens, eos_id=eos)
    greedy = [("plain", plain)]
    sampled = []
    if model.n_future > 1:
        tree = resolve_tree(None, ckpt, model.n_future - 1, model.vocab_size)
        greedy += [("self-speculative", generate(model, ids, max_new_tokens, mode="spec", eos_id=eos)),
                   ("tree", generate(model, ids, max_new_tokens, mode="tree", tree=tree, eos_id=eos))]
        sampled = [("plain, sampled T=0.8", generate(model, ids, max_new_tokens, eos_id=eos, **SAMPLING)),
                   ("spec, sampled T=0.8", generate(model, ids, max_new_tokens, mode="spec", eos_id=eos, **SAMPLING))]
    rule = "-" * 60
    parts = ["\nprompt + greedy continuation:\n" + rule, prompt + tokenizer.decode(plain.tokens[0])]
    if sampled:
        parts += [rule + "\nthe same prompt, lossless speculative sampling (T=0.8, top-p 0.95):\n" + rule,
                  prompt + tokenizer.decode(sampled[1][1].tokens[0])]
    parts.append(rule)
    rows = [(name, r, plain.stats.tokens_per_s, r.tokens == plain.tokens) for name, r in greedy]
    rows += [(name, r, sampled[0][1].stats.tokens_per_s, None) for name, r in sampled]
    parts.append(demo_table(rows))
    if sampled:
        parts.append("(sampled rows: speed-up vs plain sampling; outputs differ token by token but share one "
                     "distribution)")
    return "\n".join(parts), all(r.tokens == plain.tokens for _, r in greedy)
