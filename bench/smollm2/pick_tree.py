"""Pick the static tree for the SmolLM2 decode benchmark before running it: for each node budget,
Medusa's tree from the heads' validation top-k acceptance (saved in HEADS/tree.json by `heads train`)
and its expected tokens per pass, divided by the measured cost of a verify pass of that width
(block_kernels.md, 2 threads, block-kernel column, relative to one HF step; linear in between).
Run: .venv/bin/python bench/smollm2/pick_tree.py runs/smollm2-heads2 > runs/smollm2-heads2/tree_pick.json
"""
import json
import sys

from multitoken.decoding import build_tree, expected_accept_length

COST = {1: 0.89, 2: 1.06, 3: 1.11, 4: 1.24, 6: 1.22, 8: 1.26, 12: 1.41, 16: 1.58}  # block_kernels.md, 2 threads


def cost(width: int) -> float:
    ws = sorted(COST)
    lo = max(w for w in ws if w <= width)
    hi = min(w for w in ws if w >= width)
    return COST[lo] if lo == hi else COST[lo] + (COST[hi] - COST[lo]) * (width - lo) / (hi - lo)


acc = json.load(open(f"{sys.argv[1]}/tree.json"))["acceptance"]
best = None
for budget in range(1, 16):
    paths = build_tree(acc, budget)
    tau = expected_accept_length(paths, acc)
    score = tau / cost(len(paths) + 1)
    print(f"budget {budget:2d}: expected tau {tau:.2f}, verify cost {cost(len(paths) + 1):.2f}, "
          f"tau/cost {score:.3f}", file=sys.stderr)
    if best is None or score > best[0]:
        best = (score, budget, paths)
chain = [[0] * d for d in range(1, len(acc) + 1)]
print(f"chain of {len(chain)}: expected tau {expected_accept_length(chain, acc):.2f}, "
      f"tau/cost {expected_accept_length(chain, acc) / cost(len(chain) + 1):.3f}", file=sys.stderr)
print(f"picked budget {best[1]}", file=sys.stderr)
print(json.dumps(best[2]))
