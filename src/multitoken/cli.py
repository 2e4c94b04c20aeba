"""The `multitoken` command line: one parser, each subcommand mapped to a typed function.

Every user-facing error becomes one line on stderr and exit status 2 (never a traceback).
Subcommands import their modules lazily so `multitoken --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


class UsageError(ValueError):
    """A user mistake the CLI reports as one line, exit 2."""


# Exceptions that mean "bad input", not "bug": printed as one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
                                                KeyError, ImportError, TypeError)


# ---------------------------------------------------------------------------- bench
def cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench import bench_memory, write_markdown
    rows = bench_memory(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer,
                        seq_len=args.seq_len, batch_size=args.batch_size, head_type=args.head_type,
                        n_futures=args.n_future, repeats=args.repeats)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    table = write_markdown("memory", rows, args.markdown)
    print(table)
    return 0


def add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (memory, train, decode); results as JSON + markdown")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    mem = bsub.add_parser("memory", help="peak memory and time of one training step: naive vs memory-efficient MTP backward")
    mem.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (large, so logits dominate)")
    mem.add_argument("--d-model", type=int, default=256, help="model width")
    mem.add_argument("--n-layer", type=int, default=2, help="trunk layers")
    mem.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    mem.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    mem.add_argument("--head-type", default="residual", help="head type to measure")
    mem.add_argument("--n-future", type=int, nargs="+", default=[1, 2, 4, 8], help="n_future values to measure")
    mem.add_argument("--repeats", type=int, default=3, help="timed steps per setting (median reported)")
    mem.add_argument("--json", help="write the rows as JSON to this file")
    mem.add_argument("--markdown", help="write the markdown table to this file")
    mem.set_defaults(func=cmd_bench_memory)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
