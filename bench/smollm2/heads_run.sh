#!/usr/bin/env bash
# How bench/smollm2/heads_train.* and decode.* were produced (2-core CPU, float32, offline, quiet machine).
set -euo pipefail
export HF_HUB_OFFLINE=1
# 1. self-distillation (the base's own greedy answers, 128 tokens max, to ~110k tokens of chat requests: code
#    continuation on stdlib train-split snippets + prose tasks), hidden cache of 196,608 tokens (those texts
#    first, then the stdlib/prose corpus), sequential heads with a 4096-token draft vocabulary, 24 training minutes.
.venv/bin/python -m multitoken heads train --base smollm2 --data '<stdlib>' '<prose>' --out runs/smollm2-heads2 \
    --cache runs/smollm2-cache2 --generate-distill 110000 --max-tokens 196608 --head-type sequential --n-future 4 \
    --targets distill --draft-vocab 4096 --d-ff 768 --tree-budget 15 --epochs 50 --minutes 24 --eval-every 50 \
    --lr 2e-3 --warmup 20 --batch-size 8 --threads 2
.venv/bin/python bench/smollm2/summarize_heads_train.py runs/smollm2-heads2 bench/smollm2/heads_train
# 2. the tree: the budget with the best expected tau / measured verify cost (block_kernels.md), picked before step 3
.venv/bin/python bench/smollm2/pick_tree.py runs/smollm2-heads2 > runs/smollm2-heads2/tree_pick.json
# 3. decode benchmark (default decode path: lean forward + oneDNN kernels; rerun in the third session): 10 code prompts (stdlib validation split) + 10 built-in prose prompts, chat template,
#    greedy, 128 new tokens, 2 threads, HF greedy / HF prompt lookup / multitoken plain, chain, adaptive chain, tree.
.venv/bin/python -m multitoken bench decode --base smollm2 --heads runs/smollm2-heads2 --modes ar spec tree \
    --tree "$(cat runs/smollm2-heads2/tree_pick.json)" --max-new-tokens 128 --threads 2 --draft-cost 0.1 \
    --json bench/smollm2/decode.json --markdown bench/smollm2/decode.md
