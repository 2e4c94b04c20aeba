"""Time of one lean decode pass (decoder layers only, multitoken.hf.lean_forward) of W tokens after a
200-token prefix: for SmolLM2-135M itself and for a Llama of the same depth and head counts but
8-wide heads, whose matrix products cost next to nothing (so its time is the pass's overhead:
Python, dispatch, small ops). Best of 5 rounds of 50 passes. Run it at two commits to compare
them (NOTES.md section 9).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/pass_overhead.py
"""
import time

import torch
import transformers

from multitoken.hf.kernel_choice import cached_min_rows
from multitoken.hf.kernels import block_kernels
from multitoken.hf.lean_forward import LeanDecoderForward
from multitoken.hf.wrapper import load_heads_model

PREFIX, PASSES, ROUNDS, WIDTHS = 200, 50, 5, (1, 3, 4, 8)


def pass_ms(lean: LeanDecoderForward, vocab: int, min_rows: int) -> dict[int, float]:
    cache = lean.new_cache(1, PREFIX + 32, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    best: dict[int, float] = {}
    with torch.no_grad(), block_kernels(True, min_rows):
        lean(torch.randint(0, vocab, (1, PREFIX), generator=gen), cache)
        cache.commit(None, torch.tensor([PREFIX]))
        for _ in range(ROUNDS):
            for width in WIDTHS:
                tokens = torch.randint(0, vocab, (1, width), generator=gen)
                lean(tokens, cache)  # warm-up
                start = time.perf_counter()
                for _ in range(PASSES):
                    lean(tokens, cache)
                best[width] = min(best.get(width, 1e9), (time.perf_counter() - start) / PASSES * 1e3)
    return best


def main() -> None:
    torch.set_num_threads(2)
    model, _ = load_heads_model("smollm2", None)
    min_rows = cached_min_rows(model)
    cfg = model.base.config
    tiny = transformers.LlamaConfig(vocab_size=512, hidden_size=72, intermediate_size=192, head_dim=8,
                                    num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                    num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=1024)
    torch.manual_seed(0)
    narrow = transformers.LlamaForCausalLM(tiny).eval()
    from multitoken.hf.kernels import install_block_linears
    install_block_linears(narrow)
    rows = {"SmolLM2-135M": pass_ms(model.lean_forward, cfg.vocab_size, min_rows),
            "same depth, 8-wide heads (overhead)": pass_ms(LeanDecoderForward(narrow), 512, min_rows)}
    print(f"oneDNN from {min_rows} rows")
    print("| model | " + " | ".join(f"W={w}" for w in WIDTHS) + " |")
    print("|---|" + "---|" * len(WIDTHS))
    for name, best in rows.items():
        print(f"| {name} | " + " | ".join(f"{best[w]:.1f} ms" for w in WIDTHS) + " |")


if __name__ == "__main__":
    main()
