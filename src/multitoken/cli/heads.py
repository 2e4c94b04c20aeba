"""``multitoken heads train`` (MTP heads on a frozen Hugging Face base) and ``heads bench``."""
from __future__ import annotations

import argparse

from multitoken.cli.common import (
    add_batch_flags, add_bench_prompt_flags, add_decode_path_flags, add_draft_cost_flag, run_decode_command,
)
from multitoken.measure.decode import DECODERS
from multitoken.measure.decode_run import HF_VERIFY_WIDTHS


def cmd_heads_train(args: argparse.Namespace) -> int:
    from multitoken.training import HeadsTrainConfig, run_heads_train

    cfg = HeadsTrainConfig(n_future=args.n_future, head_type=args.head_type, targets=args.targets,
                           draft_vocab=args.draft_vocab, epochs=args.epochs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
                           max_minutes=args.minutes, eval_every=args.eval_every, tree_budget=args.tree_budget,
                           d_ff=args.d_ff, soft_targets=args.soft_targets, prompt_loss=args.prompt_loss)
    s = run_heads_train(args.base, args.data, args.out, cfg, cache_dir=args.cache, max_tokens=args.max_tokens,
                        seq_len=args.seq_len, generate_distill=args.generate_distill, threads=args.threads,
                        progress=not args.quiet, train_base_layers=args.train_base_layers,
                        lora_rank=args.lora_rank, cache_layout=args.cache_layout)
    ev = s["eval"] or {}
    built = "reused" if s["cache_reused"] else f"built in {s['cache_s']:.0f} s"
    print(f"trained {s['steps']} steps on {s['tokens']} tokens ({s['epochs']:.1f} epochs of "
          f"{s['unique_train_tokens']} cached tokens) in {s['wall_s']:.0f} s; hidden cache {built}")
    if ev:
        print("validation head accuracy (vs targets): " + " ".join(f"{a:.1%}" for a in ev["head_accuracy"][1:])
              + f"; expected chain tau {ev['expected_tau']:.2f}")
    print(f"heads saved to {s['out']}")
    return 0


def cmd_heads_bench(args: argparse.Namespace) -> int:
    return run_decode_command(args, args.decoders, False, HF_VERIFY_WIDTHS if args.verify_cost else (), None, args.quiet)


def add_heads(sub: argparse._SubParsersAction) -> None:
    heads = sub.add_parser("heads", help="MTP heads on a frozen Hugging Face causal LM: train, bench")
    hsub = heads.add_subparsers(dest="heads_command", required=True, metavar="ACTION")
    t = hsub.add_parser("train", help="train heads on cached hidden states of a frozen HF base "
                                      "(writes heads.safetensors, heads_config.json, metrics.jsonl)")
    t.add_argument("--base", required=True, help="'smollm2' or a Hugging Face model folder / .gguf file")
    t.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, folders, JSONL; '<stdlib>' (default: the stdlib train split), "
                        "'<prose>' (the stdlib's English documentation topics)")
    t.add_argument("--out", required=True, metavar="DIR", help="heads directory")
    t.add_argument("--head-type", default="sequential", choices=["sequential", "residual", "linear"],
                   help="sequential (token-conditioned, default), residual (Medusa) or linear")
    t.add_argument("--n-future", type=int, default=4, help="heads including the base's own (default 4: 3 drafts)")
    t.add_argument("--targets", default="distill", choices=["corpus", "distill"],
                   help="distill: the base's own greedy tokens (default; what acceptance needs); corpus: the text")
    t.add_argument("--soft-targets", type=float, default=0.0, metavar="W",
                   help="with distill targets: weight W in [0, 1] of the base's whole next-token distribution "
                        "(read off the cached hidden states) in each draft head's CE, 1 - W on its greedy token "
                        "(default 0: greedy tokens only)")
    t.add_argument("--cache-layout", default="documents", choices=["documents", "stream"],
                   help="documents: each text whole in a row, at its own positions, attending to itself alone "
                        "(default); stream: the texts joined and cut into rows, every position trained (the "
                        "layout the shipped SmolLM2 heads were made with)")
    t.add_argument("--prompt-loss", action="store_true",
                   help="train on the chat prompts of the cached texts too (default: only on the assistant's "
                        "answers and on plain text, the positions decoding drafts from)")
    t.add_argument("--draft-vocab", type=int, default=8192,
                   help="draft over the N most frequent base-greedy tokens of the cache (0 = full vocabulary)")
    t.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    t.add_argument("--epochs", type=float, default=4.0, help="passes over the cached rows (default 4)")
    t.add_argument("--minutes", type=float,
                   help="training time budget: the cosine schedule runs over it and training stops there")
    t.add_argument("--max-tokens", type=int, default=65536, help="tokens in the hidden cache (default 65536)")
    t.add_argument("--seq-len", type=int, default=256, help="cached sequence length (default 256)")
    t.add_argument("--batch-size", type=int, default=8, help="cached rows per step (default 8)")
    t.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    t.add_argument("--warmup", type=int, default=20, help="warm-up steps (default 20)")
    t.add_argument("--eval-every", type=int, default=50, help="validation every N steps (default 50)")
    t.add_argument("--d-ff", type=int, help="hidden width of each head's MLP (default: the base's)")
    t.add_argument("--tree-budget", type=int, default=8,
                   help="draft nodes of the static tree saved as tree.json (from validation top-k; 0 = none)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--cache", metavar="DIR", help="hidden cache folder (reused if complete; default OUT/hidden_cache)")
    t.add_argument("--generate-distill", type=int, default=0, metavar="N",
                   help="first generate about N tokens of the base's own greedy answers (chat models: code and "
                        "prose requests in the chat template; else corpus continuations) and cache those first "
                        "(documents layout: with the states generation computed, not run through the base again)")
    t.add_argument("--train-base-layers", type=int, default=0, metavar="N",
                   help="also train the base's top N layers (Medusa-2 style; the output then follows the "
                        "adapted base, not the original)")
    t.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="with --train-base-layers: LoRA adapters of rank R (peft) instead of full layers")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_heads_train)

    b = hsub.add_parser("bench", help="HF greedy vs HF prompt lookup vs multitoken plain/chain/tree on chat requests")
    b.add_argument("--base", required=True, help="'smollm2' or a Hugging Face model folder / .gguf file")
    b.add_argument("--heads", metavar="DIR", help="heads trained with `heads train`, or a shipped name "
                                                  "(default: the heads shipped for --base)")
    add_bench_prompt_flags(b)
    add_batch_flags(b)
    b.add_argument("--decoders", nargs="+", default=["hf", "hf_pld", "ar", "spec", "tree"],
                   choices=[d for d in DECODERS if d != "draft"],
                   help="spec_adaptive: the chain with each step's draft length chosen at --draft-cost")
    add_draft_cost_flag(b)
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--num-draft", type=int, help="draft tokens per step (default: all heads)")
    b.add_argument("--tree", help="static tree for the tree decoder (preset, JSON paths; default: tree.json "
                                  "next to the heads, else the medium preset)")
    b.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for HF (default 10)")
    b.add_argument("--verify-cost", action="store_true", help="also time one verify pass per width 1..16")
    add_decode_path_flags(b)
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--json", help="write rows + per-prompt results as JSON")
    b.add_argument("--markdown", help="write the markdown table")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_heads_bench)
