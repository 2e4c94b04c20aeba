"""Side-by-side: SmolLM2's decoder layers over a W-token block after a 300-token prefix, through
HF's forward + DynamicCache (F.linear, then oneDNN kernels) and through multitoken.hf_forward's lean
forward over the static KVCache (oneDNN kernels). Prints median ms per pass and the largest
difference of the final hidden states from HF's. NOTES.md section 8.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/lean_forward_check.py
"""
import statistics
import time

import torch
from transformers import DynamicCache

from multitoken.hf.lean_forward import LeanDecoderForward
from multitoken.hf.kernels import block_kernels, install_block_linears
from multitoken.hf.loading import load_smollm2

PREFIX, REPEATS = 300, 8


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_smollm2()
    model.eval()
    install_block_linears(model)
    lean = LeanDecoderForward(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, PREFIX), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf_cache = DynamicCache(config=model.config)
        ref = model.model(input_ids=prompt, cache=hf_cache, use_cache=True).last_hidden_state
        kv = lean.new_cache(1, PREFIX + 64, torch.float32, "cpu")
        out = lean(prompt, kv)
        kv.commit(None, torch.tensor([PREFIX]))
        print(f"prefill of {PREFIX} tokens: max |lean - HF| = {(out - ref).abs().max().item():.3g}")
        for width in (1, 2, 4, 8):
            block = torch.randint(0, model.config.vocab_size, (1, width))
            positions = torch.arange(PREFIX, PREFIX + width)[None]

            def hf():
                hidden = model.model(input_ids=block, cache=hf_cache, use_cache=True,
                                     position_ids=positions).last_hidden_state
                hf_cache.crop(-width)
                return hidden

            runs = {"HF, F.linear": (False, hf), "HF, oneDNN": (True, hf), "lean, oneDNN": (True, lambda: lean(block, kv))}
            times, outs = {k: [] for k in runs}, {}
            for _ in range(REPEATS):  # interleaved, so drift hits every variant alike
                for name, (fast, fn) in runs.items():
                    start = time.perf_counter()
                    with block_kernels(fast):
                        outs[name] = fn()
                    times[name].append(time.perf_counter() - start)
            diff = (outs["lean, oneDNN"] - outs["HF, oneDNN"]).abs().max().item()
            print(f"W={width}: " + ", ".join(f"{k} {statistics.median(v) * 1000:.1f} ms" for k, v in times.items())
                  + f"; max |lean - HF| (both oneDNN) = {diff:.3g}")


if __name__ == "__main__":
    main()
