"""How close are SmolLM2's greedy decisions to ties, and does block verification (k new tokens
per forward over a DynamicCache) reproduce HF ``generate`` greedy token for token?

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/greedy_identity_check.py
"""
import os

import torch
from transformers import DynamicCache

from multitoken.hf.loading import apply_chat_template_or_fail, load_smollm2

PROMPTS = ["def quicksort(items):\n", "import os\n\n\ndef walk_files(root):\n",
           "class Stack:\n    def __init__(self):\n",
           "Explain what a hash table is.", "Write a haiku about autumn.", "What is the capital of France?"]


@torch.inference_mode()
def main(new: int = 64) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    model, tok = load_smollm2()
    gaps, mismatches, total = [], {k: 0 for k in (1, 4, 8, 16)}, 0
    for i, p in enumerate(PROMPTS):
        text = p if i < 3 else apply_chat_template_or_fail(tok, p)
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        # no min_new_tokens: it would mask EOS and make generate pick a non-argmax token
        out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        seq, P = out.sequences, ids.shape[1]
        n = seq.shape[1] - P
        top2 = torch.stack(out.logits)[:, 0].topk(2, -1).values  # (n, 2) raw logits
        gaps.append(top2[:, 0] - top2[:, 1])
        total += n
        for k in mismatches:  # verify the generated continuation in blocks of k
            cache = DynamicCache(config=model.config)
            model(seq[:, :P - 1], cache=cache, use_cache=True)
            for s in range(P - 1, P - 1 + n, k):
                block = seq[:, s:min(s + k, P - 1 + n)]
                pred = model(block, cache=cache, use_cache=True).logits[0].argmax(-1)
                mismatches[k] += int((pred != seq[0, s + 1:s + 1 + block.shape[1]]).sum())
    g = torch.cat(gaps)
    print(f"{len(PROMPTS)} prompts, {total} greedy tokens (<= {new} each): top1-top2 logit gap min {g.min():.2e}, "
          f"5th percentile {g.quantile(0.05):.3f}, gaps < 1e-3: {(g < 1e-3).sum().item()}")
    for k, m in mismatches.items():
        print(f"block verification k={k}: {m} / {total} positions disagree with HF generate greedy")


if __name__ == "__main__":
    main()
