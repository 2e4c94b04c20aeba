"""The demo's decoding half: one prompt decoded plainly, self-speculatively and with a tree
(greedy, then sampled) in one process, as text for the console."""
from __future__ import annotations

import torch

from multitoken.decoding import generate, resolve_tree
from multitoken.measure.decode_tables import demo_table

DEMO_PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the command line.\"\"\"\n"
SAMPLING = dict(temperature=0.8, top_p=0.95, seed=0)  # greedy text of a minutes-old byte model degenerates


def demo_decode(ckpt, prompt: str = DEMO_PROMPT, max_new_tokens: int = 256) -> tuple[str, bool]:
    """(text to print, every greedy decoder reproduced plain decoding) for a checkpoint."""
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
        tree = resolve_tree(None, ckpt, model.n_future - 1)
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
