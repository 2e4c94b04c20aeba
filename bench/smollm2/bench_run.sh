#!/usr/bin/env bash
# How bench/smollm2/decode*.{json,md} were produced, after src/multitoken/hf/heads/smollm2/recipe.sh (quiet 2-core CPU, float32, offline):
# ship the heads (16-bit copy into the package), then benchmark them on the packaged natural requests.
set -euo pipefail
export HF_HUB_OFFLINE=1
RUN=${RUN:-runs/smollm2-heads5}
if [ -d "$RUN" ]; then  # a fresh clone has no run folder: it benchmarks the committed heads
  .venv/bin/python -c "from multitoken.hf.shipped import export_heads; export_heads('$RUN', 'src/multitoken/hf/heads/smollm2')"
fi
# Batch 1: HF greedy (reference), HF prompt lookup, multitoken plain, chain (cost-aware draft length, the default),
# chain with every head every step, the cost-aware tree of the heads alone, and the default tree (that tree with
# prompt-lookup chains grafted on where they pay); 8 requests per group + 8 code continuations.
.venv/bin/python -m multitoken bench decode --base smollm2 --modes hf_pld ar spec spec_full tree_heads tree \
    --per-group 8 --code-prompts 8 --max-new-tokens 128 --threads 2 \
    --json bench/smollm2/decode.json --markdown bench/smollm2/decode.md
# Batches of 4 and 8 prompts: HF batched greedy (left padding) vs multitoken plain / chain / tree, batched.
for B in 4 8; do
  .venv/bin/python -m multitoken bench decode --base smollm2 --batch-size "$B" --modes ar spec tree_heads tree \
      --per-group 8 --code-prompts 8 --max-new-tokens 128 --threads 2 \
      --json "bench/smollm2/decode_b$B.json" --markdown "bench/smollm2/decode_b$B.md"
done
