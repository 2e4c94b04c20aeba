#!/usr/bin/env bash
# How bench/smollm2/heads_train.* and decode.* were produced (2-core CPU, float32, offline).
set -euo pipefail
export HF_HUB_OFFLINE=1
# 1. hidden cache (90,112 tokens: stdlib train split + the stdlib's English docs) + sequential heads,
#    self-distillation targets, 2048-token draft vocabulary, heads with d_ff 768, a 14-minute training budget.
.venv/bin/python -m multitoken heads train --base smollm2 --data '<stdlib>' '<prose>' --out runs/smollm2-heads \
    --cache runs/smollm2-cache --max-tokens 90112 --head-type sequential --n-future 4 --targets distill \
    --draft-vocab 2048 --d-ff 768 --tree-budget 15 --epochs 50 --minutes 14 --eval-every 20 --lr 2e-3 --warmup 5 \
    --batch-size 4 --threads 2
.venv/bin/python bench/smollm2/summarize_heads_train.py runs/smollm2-heads bench/smollm2/heads_train
# 2. decode benchmark: 10 code prompts (stdlib validation split) + 10 prose prompts, chat template, greedy.
.venv/bin/python -m multitoken heads bench --base smollm2 --heads runs/smollm2-heads --code-prompts 10 \
    --prose bench/smollm2/prose_prompts.txt --prose-prompts 10 --max-new-tokens "${NEW:-64}" \
    --threads 1 --json bench/smollm2/decode.json --markdown bench/smollm2/decode.md
# The committed run was stopped (time budget of the session) after the prompts in decode.json; its
# decode.json.partial was turned into decode.json/.md (verify cost timed separately) with:
#   .venv/bin/python bench/smollm2/finalize_decode.py runs/smollm2-heads bench/smollm2/decode
