"""``multitoken demo``: what MTP buys, shown in minutes."""
from __future__ import annotations

import argparse

from multitoken.cli.common import OneLineWarnings


def cmd_demo(args: argparse.Namespace) -> int:
    from multitoken.measure.demo import demo_decode
    from multitoken.training import format_head_table, read_eval, train_demo_model

    with OneLineWarnings():
        ckpt = train_demo_model(args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    ev = read_eval(ckpt)
    print(f"model: {ckpt}")
    if ev is not None:
        print("per-head validation metrics (head i predicts token t+i+1):")
        print(format_head_table(ev))
    text, identical = demo_decode(ckpt)
    print(text)
    return 0 if identical else 1


def add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="train the small preset on the stdlib sources and show what the heads learned",
                       description="Train the `small` preset (byte-level, 3 sequential draft heads) on the Python standard "
                                   "library sources into OUT/model (reused if already trained, resumed if "
                                   "interrupted) and print per-head validation loss and accuracy.")
    p.add_argument("--out", metavar="DIR", default="runs/demo", help="demo directory (default runs/demo)")
    p.add_argument("--steps", type=int, metavar="N", help="training steps (default: the small preset's)")
    p.add_argument("--device", metavar="D", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
