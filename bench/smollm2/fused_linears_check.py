"""Side-by-side: whole SmolLM2 verify passes (lean forward, the machine's kernel choice) with the
q/k/v and gate/up projections as one oneDNN product each (multitoken.hf.kernels.FusedBlockLinears)
and as separate products, interleaved, after a 200-token prefix. Prints the best of 3 rounds of
20 passes per width, and the largest logit difference between the two. NOTES.md section 9.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/fused_linears_check.py
"""
import time

import torch

from multitoken.hf.wrapper import load_heads_model

PREFIX, PASSES, ROUNDS, WIDTHS = 200, 20, 3, (1, 2, 3, 4, 6, 8, 16)


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_heads_model("smollm2", None)
    state = model.new_state(1, 1024)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.base.config.vocab_size, (1, PREFIX), generator=gen)
    model.verify_last(state, prompt, torch.tensor([PREFIX - 1]))
    model.accept(state, None, torch.tensor([PREFIX]))
    fused = [part.qkv for part in model.lean_forward.layers] + [part.gate_up for part in model.lean_forward.layers]
    print(f"kernel choice: oneDNN from {model.block_min_rows} rows")

    def passes(tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
        start = time.perf_counter()
        for _ in range(PASSES):
            logits = model.verify(state, tokens)
            model.crop(state, torch.tensor([PREFIX]))
        return (time.perf_counter() - start) / PASSES * 1e3, logits

    best: dict[tuple[int, bool], float] = {}
    diff: dict[int, float] = {}
    for _ in range(ROUNDS):
        for width in WIDTHS:
            tokens = torch.randint(0, model.base.config.vocab_size, (1, width), generator=gen)
            out = {}
            for on in (False, True):
                for f in fused:
                    f.fusable = on
                passes(tokens)  # warm-up (and the first reorder of the fused weights)
                ms, out[on] = passes(tokens)
                best[width, on] = min(ms, best.get((width, on), ms))
            diff[width] = max(diff.get(width, 0.0), float((out[True] - out[False]).abs().max()))
    print("| W | separate products | fused q/k/v and gate/up | ratio | max |logit difference| |")
    print("|---|---|---|---|---|")
    for width in WIDTHS:
        sep, fus = best[width, False], best[width, True]
        print(f"| {width} | {sep:.1f} ms | {fus:.1f} ms | {fus / sep:.3f} | {diff[width]:.1e} |")


if __name__ == "__main__":
    main()
