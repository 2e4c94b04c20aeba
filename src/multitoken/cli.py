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
def _bench_outputs(name: str, result: dict, args: argparse.Namespace, command: str) -> None:
    """Write --json / --markdown / --readme for one bench result and print its table."""
    from .bench import update_readme, write_markdown
    command += "".join(f" --{flag} {value}" for flag, value in (("device", args.device), ("threads", args.threads))
                       if value is not None and value != "cpu")
    result["command"] = command  # so `bench readme` can quote it later
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    table = write_markdown(name, result, args.markdown)
    if args.readme:
        update_readme(args.readme, name, table, command)
    print(table)


def _bench_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _bench_failed(e: Exception) -> int:
    """A crashed worker process (not bad input): one line, exit 1."""
    print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
    return 1


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from .bench import BenchWorkerError, bench_memory
    try:
        result = bench_memory(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer,
                              seq_len=args.seq_len, batch_size=args.batch_size, head_type=args.head_type,
                              n_futures=args.n_future, repeats=args.repeats, chunk_size=args.chunk_size,
                              device=args.device, isolate=not args.in_process, threads=args.threads,
                              progress=None if args.quiet else _bench_progress)
    except BenchWorkerError as e:
        return _bench_failed(e)
    command = (f"multitoken bench memory --vocab-size {args.vocab_size} --d-model {args.d_model} "
               f"--n-layer {args.n_layer} --seq-len {args.seq_len} --batch-size {args.batch_size} "
               f"--head-type {args.head_type} --n-future {' '.join(map(str, args.n_future))} "
               f"--chunk-size {args.chunk_size} --repeats {args.repeats}")
    _bench_outputs("memory", result, args, command)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench import BenchWorkerError, bench_train
    try:
        result = bench_train(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer,
                             n_head=args.n_head, seq_len=args.seq_len, batch_size=args.batch_size,
                             head_types=args.head_type, n_futures=args.n_future, backward=args.backward,
                             repeats=args.repeats, device=args.device, isolate=not args.in_process,
                             threads=args.threads, progress=None if args.quiet else _bench_progress)
    except BenchWorkerError as e:
        return _bench_failed(e)
    command = (f"multitoken bench train --vocab-size {args.vocab_size} --d-model {args.d_model} "
               f"--n-layer {args.n_layer} --n-head {args.n_head} --seq-len {args.seq_len} "
               f"--batch-size {args.batch_size} --n-future {' '.join(map(str, args.n_future))} "
               f"--backward {args.backward} --repeats {args.repeats}"
               + (f" --head-type {' '.join(args.head_type)}" if args.head_type else ""))
    _bench_outputs("train", result, args, command)
    return 0


def cmd_bench_readme(args: argparse.Namespace) -> int:
    from .bench import load_result, update_readme, write_markdown
    folder = Path(args.dir)
    readme = Path(args.readme) if args.readme else folder / "README.md"
    names = [n for n in ("memory", "train") if (folder / f"{n}.json").exists()]
    if not names:
        raise FileNotFoundError(f"no memory.json or train.json in {folder}")
    for name in names:
        result = load_result(folder / f"{name}.json")
        update_readme(readme, name, write_markdown(name, result), result.get("command"))
    print(f"updated {readme}: {', '.join(names)}")
    return 0


def _bench_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repeats", type=int, default=3, help="timed steps per setting after one warm-up (median reported)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--threads", type=int, help="torch threads in each worker (default: torch's)")
    p.add_argument("--in-process", action="store_true",
                   help="measure in this process, not one fresh process per setting (peak memory less reliable)")
    p.add_argument("--json", help="write the result (machine, date, settings, rows) as JSON to this file")
    p.add_argument("--markdown", help="write the markdown table to this file")
    p.add_argument("--readme", help="also refresh this benchmark's section of a README (e.g. bench/README.md)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def add_bench(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks (memory, train, decode); results as JSON + markdown")
    bsub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    mem = bsub.add_parser("memory", help="peak memory and time of one training step: naive vs memory-efficient MTP backward",
                          description="One training step (forward + backward, no optimizer) per setting, naive vs "
                                      "memory-efficient MTP backward (with and without CE chunking), in one fresh "
                                      "process per n_future with the methods interleaved: peak memory, median step "
                                      "time, max |grad difference|.")
    mem.add_argument("--vocab-size", type=int, default=32768, help="vocabulary size (large, so logits dominate)")
    mem.add_argument("--d-model", type=int, default=128, help="model width")
    mem.add_argument("--n-layer", type=int, default=2, help="trunk layers")
    mem.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    mem.add_argument("--batch-size", type=int, default=2, help="sequences per step")
    mem.add_argument("--head-type", default="residual", help="head type to measure")
    mem.add_argument("--n-future", type=int, nargs="+", default=[1, 2, 4, 8], help="n_future values to measure")
    mem.add_argument("--chunk-size", type=int, default=64, help="positions per CE chunk of the mtp_chunked method")
    _bench_common_args(mem)
    mem.set_defaults(func=cmd_bench_memory)
    train = bsub.add_parser("train", help="training-step time, tokens/s, peak memory: next-token vs MTP per head type",
                            description="Full training steps (AdamW) of next-token training and of MTP with each head "
                                        "type and n_future on one config, interleaved in one fresh process.")
    train.add_argument("--vocab-size", type=int, default=257, help="vocabulary size (257 = the byte-level tokenizer)")
    train.add_argument("--d-model", type=int, default=256, help="model width")
    train.add_argument("--n-layer", type=int, default=4, help="trunk layers")
    train.add_argument("--n-head", type=int, default=4, help="attention heads")
    train.add_argument("--seq-len", type=int, default=256, help="tokens per sequence")
    train.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    train.add_argument("--head-type", nargs="+", help="head types to measure (default: all)")
    train.add_argument("--n-future", type=int, nargs="+", default=[2, 4], help="MTP n_future values to measure")
    train.add_argument("--backward", choices=("mtp", "naive"), default="mtp",
                       help="backward of the MTP rows: mtp = memory-efficient (default) or naive")
    _bench_common_args(train)
    train.set_defaults(func=cmd_bench_train)
    readme = bsub.add_parser("readme", help="rebuild the memory/train sections of bench/README.md from their JSON files")
    readme.add_argument("--dir", default="bench", help="folder holding memory.json / train.json")
    readme.add_argument("--readme", help="README to update (default: DIR/README.md)")
    readme.set_defaults(func=cmd_bench_readme)


# ---------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze, format_analysis
    from .config import MTPConfig
    if bool(args.config) == bool(args.model):
        raise UsageError("give exactly one of --config FILE or --model DIR")
    if args.model and not Path(args.model).is_dir():
        raise FileNotFoundError(f"model directory not found: {args.model}")
    cfg = MTPConfig.load(Path(args.config) if args.config else Path(args.model) / "config.json")
    result = analyze(cfg, seq_len=args.seq_len, batch_size=args.batch_size, chunk_size=args.chunk_size,
                     bench=args.bench)
    print(json.dumps(result, indent=2) if args.json else format_analysis(result).rstrip("\n"))
    return 0


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="exact parameter, FLOP, memory and supervision counts of a config",
                       description="Parameters of trunk vs heads, training FLOPs per token with and without heads, "
                                   "activation/logit memory per step (naive vs memory-efficient), supervision signals "
                                   "per sequence, and with --bench the decoding speed-up bound tau*t(1)/t(verify).")
    p.add_argument("--config", help="MTPConfig JSON file")
    p.add_argument("--model", help="model directory holding config.json")
    p.add_argument("--seq-len", type=int, help="sequence length T (default: the config's max_seq_len)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per step for the memory estimate")
    p.add_argument("--chunk-size", type=int, help="CE chunk of the memory-efficient step (default: T)")
    p.add_argument("--bench", help="decoding bench JSON: adds the speed-up bound per mode")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_analyze)


# ---------------------------------------------------------------------------- report
def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report
    out = render_report(args.run_dir, args.out, args.bench or [])
    print(f"wrote {out['report']} and {len(out['plots'])} plot(s)")
    return 0


def add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="plots + markdown summary of a run dir (metrics.jsonl, bench JSON files)",
                       description="Render training curves per head, acceptance rate per draft position, tau and "
                                   "speed-up per decoding mode, memory vs n_future, and report.md. Needs matplotlib.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run directory (metrics.jsonl, *.json, bench/*.json)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/report)")
    p.add_argument("--bench", nargs="+", help="extra bench JSON files (memory, train or decode results)")
    p.set_defaults(func=cmd_report)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench(sub)
    add_analyze(sub)
    add_report(sub)
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
