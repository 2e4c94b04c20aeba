"""The `multitoken` command line: one parser, each subcommand mapped to a typed function.

Every user error (:class:`~multitoken.errors.MultitokenError`, an ``OSError`` on a file the user
named, argparse's own) becomes one line on stderr and exit status 2; anything else is a bug
and shows its traceback. Command modules import the library lazily so `multitoken --help`
stays fast.
"""
from __future__ import annotations

import argparse
import sys

from multitoken.cli import analyze, bench, demo, generate, heads, train
from multitoken.cli.common import UsageError
from multitoken.errors import MultitokenError, first_line

__all__ = ["main", "build_parser", "UsageError"]

# Exceptions that mean "bad input", not "bug": printed as one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (MultitokenError, OSError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_bench(sub)
    analyze.add_analyze(sub)
    analyze.add_report(sub)
    train.add_train(sub, parser)
    generate.add_generate(sub)
    generate.add_tune_tree(sub)
    demo.add_demo(sub)
    heads.add_heads(sub)
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
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
