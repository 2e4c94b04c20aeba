#!/usr/bin/env bash
# How these shipped SmolLM2 heads (src/multitoken/hf/heads/smollm2/) and bench/smollm2/heads_train.* were made:
# 2-core CPU, float32, offline. Run from the repository root after `make install`.
set -euo pipefail
export HF_HUB_OFFLINE=1
RUN=${RUN:-runs/smollm2-heads5}
CACHE=${CACHE:-runs/smollm2-cache5}
# 1. Self-distillation: the base's own greedy answers (128 tokens max) to ~4,200 chat requests, ~480k answer
#    tokens: every 4th a "Continue this Python code" request on a stdlib train-split snippet, the rest the broad
#    offline mix of multitoken.data.distill_requests (stdlib-derived function/class/completion/review tasks,
#    templated questions, explanations, lists, emails, stories, advice), a quarter of those written by the model
#    itself from the chat template's user-turn prefix (Magpie-style). None equals a benchmark prompt. Requests
#    are batched 64 at a time by length, so padding costs next to nothing (292 answer tokens/s here).
#    Then a hidden-state cache of 786,432 tokens (those texts: 62% answer tokens), sequential heads (3 draft
#    depths) with a 4096-token draft vocabulary, 1500 AdamW steps of 8 x 256 tokens (a step budget, so the
#    result does not depend on the machine's load), each draft head's CE half on the base's greedy token and
#    half on its whole next-token distribution (--soft-targets 0.5, read off the cached hidden states).
#    On 2 cores, 67 min in all: self-instruct 4.5 min, the answers 27 min, the hidden cache 13 min, training 25 min.
#    The cache is the stream layout (texts joined and cut into rows, every position trained): heads made from the
#    same answers in the default documents layout (each text whole, trained on its answer) were no better
#    (bench/smollm2/NOTES.md §11), so these stay.
.venv/bin/python -m multitoken heads train --base smollm2 --data '<stdlib>' '<prose>' --out "$RUN" \
    --cache "$CACHE" --cache-layout stream --generate-distill 480000 --max-tokens 786432 --head-type sequential --n-future 4 \
    --targets distill --soft-targets 0.5 --draft-vocab 4096 --d-ff 768 --tree-budget 15 --steps 1500 --eval-every 100 \
    --lr 2e-3 --warmup 30 --batch-size 8 --threads 2
.venv/bin/python bench/smollm2/summarize_heads_train.py "$RUN" bench/smollm2/heads_train
