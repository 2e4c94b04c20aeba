"""Throughput of the frozen SmolLM2 forward that fills a hidden-state cache (seq_len 256).

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/hidden_cache.py [--tokens 8192] [--out DIR]
Texts: non-test Python stdlib sources of this interpreter, sorted by path.
"""
import argparse
import os
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from multitoken.hf import HiddenCache, build_hidden_cache, load_smollm2


def stdlib_texts():
    root = Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).parts
        if rel[0] in ("site-packages", "test", "idlelib") or "tests" in rel:
            continue
        yield p.read_text(encoding="utf-8", errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    out = Path(args.out or tempfile.mkdtemp()) / "hidden"
    load0 = os.getloadavg()[0]
    t = time.perf_counter()
    cache = build_hidden_cache(model, tok, stdlib_texts(), out, seq_len=args.seq_len,
                               max_tokens=args.tokens, batch_size=args.batch_size, progress=False)
    dt = time.perf_counter() - t
    n = cache.meta["count"]
    print(f"hidden cache: {n} tokens (seq_len {args.seq_len}, batch {args.batch_size}) in {dt:.1f} s "
          f"= {n / dt:.0f} tokens/s incl. tokenisation, load average {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    c = HiddenCache(out)
    h, x, g = c.get([0])
    agree = (g[0, :-1] == x[0, 1:]).float().mean().item()
    print(f"disk: {sum(f.stat().st_size for f in out.iterdir()) / 2**20:.1f} MiB; |h| max {np.abs(c.hidden[:]).max():.1f}; "
          f"base greedy = next corpus token on row 0: {agree:.0%}")


if __name__ == "__main__":
    main()
