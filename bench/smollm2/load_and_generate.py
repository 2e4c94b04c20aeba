"""SmolLM2 load times (cold GGUF -> safetensors cache, then cached) and HF greedy generate speed.

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/load_and_generate.py [--cache DIR]
A fresh --cache folder measures the cold (dequantising) load; the second load reads the copy.
"""
import argparse
import os
import tempfile
import time

import torch

from multitoken.hf.loading import apply_chat_template_or_fail, load_causal_lm, find_smollm2_gguf, load_smollm2

CODE_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default=None, help="cache folder (default: a new temporary one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3, help="generate runs per prompt; the best is reported")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    cache = args.cache or os.path.join(tempfile.mkdtemp(), "smollm2-float32")

    t0 = time.perf_counter()
    model, tok = load_smollm2(cache_dir=cache)
    t1 = time.perf_counter()
    model, tok = load_smollm2(cache_dir=cache)
    t2 = time.perf_counter()
    print(f"load cold (GGUF dequantise + write cache + reload): {t1 - t0:.1f} s, load average {os.getloadavg()[0]:.1f}")
    print(f"load cached: {t2 - t1:.1f} s")

    # the cached copy must give the GGUF-loaded model's logits exactly
    gmodel, gtok = load_causal_lm(find_smollm2_gguf())
    ids = tok(CODE_PROMPT, return_tensors="pt").input_ids
    assert ids.tolist() == gtok(CODE_PROMPT, return_tensors="pt").input_ids.tolist()
    with torch.inference_mode():
        same = torch.equal(model(ids).logits, gmodel(ids).logits)
    print(f"cached logits == GGUF-loaded logits: {same}")
    del gmodel, gtok

    for name, prompt in [("code", CODE_PROMPT),
                         ("chat", apply_chat_template_or_fail(tok, "Write a Python function that reverses a string."))]:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=4, do_sample=False)  # warm-up
            times = []
            for _ in range(args.runs):  # best of several: other processes may share the CPU
                t = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)
                times.append(time.perf_counter() - t)
        n = out.shape[1] - ids.shape[1]
        print(f"[{name}] HF generate greedy: {n} tokens, best {min(times):.2f} s = {n / min(times):.1f} tok/s, "
              f"worst {n / max(times):.1f} tok/s ({args.threads} threads, load average {os.getloadavg()[0]:.1f})")
        print(repr(tok.decode(out[0, ids.shape[1]:])))


if __name__ == "__main__":
    main()
