"""Smoke check of base adaptation on SmolLM2 (LoRA r=8 on the top 2 layers, 24 steps on an 8k-token layer-28 cache):
    HF_HUB_OFFLINE=1 .venv/bin/python -m multitoken heads train --base smollm2 --data "<stdlib>" --out runs/smollm2-lora \
        --cache runs/smollm2-lcache --max-tokens 8192 --train-base-layers 2 --lora-rank 8 --steps 24 --batch-size 4 \
        --draft-vocab 4096 --eval-every 12 --threads 2
    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/lora_check.py
Reports how far the adapted base moved from the original and whether spec/tree decoding reproduce the adapted base."""
import json, torch
torch.set_num_threads(2)
from multitoken.hf.wrapper import load_heads_model
from multitoken.decoding import generate
from multitoken.data import PROSE_PROMPTS
from multitoken.hf.loading import chat_ids
from multitoken.hf.loading import load_smollm2
m = json.load(open("runs/smollm2-lora/train_summary.json"))
print("first/last primary (base head CE vs original greedy):", round(m["first_eval"]["primary"], 4), round(m["eval"]["primary"], 4),
      "head0 acc", round(m["first_eval"]["head_accuracy"][0], 3), round(m["eval"]["head_accuracy"][0], 3))
model, tok = load_heads_model("smollm2", "runs/smollm2-lora")
print("adaptation", model.adaptation, "lora params", sum(p.numel() for n, p in model.base.named_parameters() if "lora_" in n))
orig, _ = load_smollm2()
same_as_original = 0
for p in PROSE_PROMPTS[:3]:
    ids = torch.tensor([chat_ids(tok.hf, p)])
    ref = model.base.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    o = orig.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    same_as_original += ref == o
    for mode in ("spec", "tree"):
        out = generate(model, ids, 32, mode=mode, eos_id=tok.eos_id)
        print(mode, "identical to adapted base:", out.tokens[0] == ref[:len(out.tokens[0])] and len(out.tokens[0]) == len(ref), "tau", round(out.stats.tau, 2))
print("adapted greedy == original greedy on", same_as_original, "of 3 prompts")
