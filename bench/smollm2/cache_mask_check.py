"""Checks behind bench/smollm2/NOTES.md: custom 4D tree masks with explicit position_ids over a
DynamicCache, DynamicCache.crop semantics, and compacting accepted tree nodes in the cache.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/cache_mask_check.py [--smollm2]
Default: a tiny random Llama (seconds). --smollm2: the real model (cached copy).
"""
import argparse
import os

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

# A tree of W=6 block nodes: node 0 is the pending token (depth 0); parents[i] is node i's parent.
PARENTS = [-1, 0, 0, 1, 2, 3]  # paths: 0-1-3-5 and 0-2-4
DEPTHS = [0, 1, 1, 2, 2, 3]


def tree_mask(parents: list[int]) -> torch.Tensor:
    """(W, W) bool: node i sees its ancestors and itself."""
    w = len(parents)
    m = torch.zeros(w, w, dtype=torch.bool)
    for i in range(w):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


def path_to(i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = PARENTS[i]
    return out[::-1]


def prefill(model, prefix: torch.Tensor) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model(prefix, cache=cache, use_cache=True)
    return cache


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    if args.smollm2:
        from multitoken.hf.loading import load_smollm2
        model, _ = load_smollm2()
    else:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=2)).eval()
    print("attn implementation:", model.config._attn_implementation)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    P = 37
    prefix = torch.randint(0, V, (1, P), generator=g)
    block = torch.randint(0, V, (1, len(PARENTS)), generator=g)  # (1, W)
    W = block.shape[1]
    pos = (P + torch.tensor(DEPTHS)).unsqueeze(0)  # (1, W)
    tm = tree_mask(PARENTS)
    bool4d = torch.cat([torch.ones(W, P, dtype=torch.bool), tm], 1)[None, None]  # (1, 1, W, P+W)
    add4d = torch.zeros(bool4d.shape).masked_fill(~bool4d, torch.finfo(torch.float32).min)

    # reference: each node's logits from a plain chain forward over prefix + its root-to-node path
    ref = torch.empty(W, V)
    for i in range(W):
        p = path_to(i)
        cache = prefill(model, prefix)
        ref[i] = model(block[:, p], cache=cache, use_cache=True).logits[0, -1]

    for impl in ("sdpa", "eager"):
        model.config._attn_implementation = impl
        for name, mask in (("bool", bool4d), ("additive", add4d)):
            cache = prefill(model, prefix)
            try:
                out = model(block, cache=cache, attention_mask=mask, position_ids=pos, use_cache=True).logits[0]
                err = (out - ref).abs().max().item()
                print(f"{impl:5s} {name:8s} 4D tree mask: max |tree - chain| = {err:.2e}, "
                      f"argmax equal {torch.equal(out.argmax(-1), ref.argmax(-1))}, cache len {cache.get_seq_length()}")
            except Exception as e:  # noqa: BLE001 - report what this transformers version does
                print(f"{impl:5s} {name:8s} 4D tree mask: {type(e).__name__}: {str(e).splitlines()[0]}")
    model.config._attn_implementation = "sdpa"

    # crop semantics
    cache = prefill(model, prefix)
    for arg in (-3, 0, P - 3):
        try:
            cache.crop(arg)
            print(f"crop({arg}): ok, length now {cache.get_seq_length()}")
        except ValueError as e:
            print(f"crop({arg}): ValueError: {str(e).splitlines()[0]}")
    layer = cache.layers[0]
    print("layer type:", type(layer).__name__, "keys", tuple(layer.keys.shape), "values", tuple(layer.values.shape),
          "(B, H_kv, S, head_dim)")

    # tree accept: keep block nodes of path 0-1-3-5, compact their KV into place, continue decoding
    keep = torch.tensor(path_to(5))
    cache = prefill(model, prefix)
    model(block, cache=cache, attention_mask=bool4d, position_ids=pos, use_cache=True)
    idx = torch.cat([torch.arange(P), P + keep])
    for lyr in cache.layers:
        lyr.keys = lyr.keys.index_select(2, idx)
        lyr.values = lyr.values.index_select(2, idx)
    nxt = torch.randint(0, V, (1, 1), generator=g)
    got = model(nxt, cache=cache, use_cache=True).logits[0, -1]
    chain = prefill(model, torch.cat([prefix, block[:, keep], nxt], 1))
    want = model(torch.cat([prefix, block[:, keep], nxt], 1)).logits[0, -1]
    print(f"compact by index_select on layer.keys/values: cache len {cache.get_seq_length()} "
          f"(= P + {len(keep)} + 1), next-step max |compacted - plain| = {(got - want).abs().max().item():.2e}")
    del chain

    # batch > 1 with ragged rows: row 1 carries 3 dead slots in its cache (e.g. rejected drafts of an
    # earlier step that row 0 accepted). A 4D mask hides them and position_ids skip them.
    holes = torch.randint(0, V, (1, 3), generator=g)
    nxt2 = torch.randint(0, V, (2, 2), generator=g)
    rows = torch.cat([torch.cat([prefix, block[:, :3]], 1), torch.cat([prefix, holes], 1)])  # (2, P+3)
    cache = prefill(model, rows)
    S = rows.shape[1]
    vis = torch.ones(2, 1, 2, S + 2, dtype=torch.bool)
    vis[1, :, :, P:P + 3] = False  # row 1: the 3 dead slots
    vis[:, :, 0, S + 1] = False  # causal inside the new block
    pos2 = torch.tensor([[S, S + 1], [P, P + 1]])
    for mname, m4 in (("bool", vis), ("additive",
                      torch.zeros(vis.shape, dtype=model.dtype).masked_fill(~vis, torch.finfo(model.dtype).min))):
        got = model(nxt2, cache=cache, attention_mask=m4, position_ids=pos2, use_cache=True).logits
        cache.crop(-2)
        want0 = model(torch.cat([rows[:1], nxt2[:1]], 1)).logits[0, -2:]
        want1 = model(torch.cat([prefix, nxt2[1:]], 1)).logits[0, -2:]
        err = max((got[0] - want0).abs().max().item(), (got[1] - want1).abs().max().item())
        print(f"ragged batch, dead cache slots hidden by a {mname} 4D mask: max |batched - plain| = {err:.2e}")

    # a float32 additive mask on a bfloat16 model
    mb = model.to(torch.bfloat16)
    cache = prefill(mb, prefix)
    try:
        mb(block, cache=cache, attention_mask=add4d, position_ids=pos, use_cache=True)
        print("bfloat16 model + float32 additive mask: accepted")
    except Exception as e:  # noqa: BLE001
        print(f"bfloat16 model + float32 additive mask: {type(e).__name__}: {str(e).splitlines()[0]}")


if __name__ == "__main__":
    main()
