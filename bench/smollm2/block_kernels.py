"""Verify-pass cost per block width W on SmolLM2 with F.linear (HF as shipped) vs multitoken's
small-block kernel (multitoken.kernels). Interleaved, min of reps, logits compared.
Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/block_kernels.py [threads]"""
import os, sys, time
import torch
from transformers import DynamicCache
from multitoken.hf.kernels import block_kernels, install_block_linears
from multitoken.hf.loading import load_smollm2

torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
model, _ = load_smollm2()
print("converted linears:", install_block_linears(model))
ids = torch.randint(0, 49152, (1, 216), generator=torch.Generator().manual_seed(0))
cache = DynamicCache(config=model.config)
with torch.inference_mode():
    model(ids[:, :200], cache=cache, use_cache=True)

def one(k, on):
    with torch.inference_mode(), block_kernels(on):
        t = time.perf_counter()
        out = model(ids[:, 200:200 + k], cache=cache, use_cache=True).logits
        dt = time.perf_counter() - t
    cache.crop(-k)
    return dt, out

print(f"torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}")
print("| W | F.linear ms | block kernel ms | ratio | max abs diff | argmax equal |")
print("|---|---|---|---|---|---|")
base1 = None
for k in (1, 2, 3, 4, 6, 8, 12, 16):
    ts = {False: [], True: []}
    for _ in range(7):
        for on in (False, True):
            dt, out = one(k, on)
            ts[on].append(dt)
            outs = out if not on else outs
            if on:
                diff = (out - ref).abs().max().item(); same = torch.equal(out.argmax(-1), ref.argmax(-1))
            else:
                ref = out
    a, b = min(ts[False]) * 1e3, min(ts[True]) * 1e3
    base1 = base1 or a
    print(f"| {k} | {a:.1f} ({a / base1:.2f}x) | {b:.1f} ({b / base1:.2f}x) | {b / a:.2f} | {diff:.1e} | {same} |", flush=True)
print(f"load after {os.getloadavg()[0]:.1f}")
