"""``multitoken bench memory | train | decode | readme``: run a benchmark, print its table, write
--json / --markdown / --readme."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multitoken.cli.common import (add_batch_flags, add_bench_prompt_flags, add_decode_path_flags, add_draft_cost_flag,
                                   check_outputs, progress_line, run_decode_command)
from multitoken.errors import MultitokenError
from multitoken.io import write_json


def _bench_outputs(name: str, result: dict, args: argparse.Namespace, command: str) -> None:
    """Write --json / --markdown / --readme for one bench result and print its table."""
    from multitoken.measure.tables import update_readme, write_markdown
    command += "".join(f" --{flag} {value}" for flag, value in (("device", args.device), ("threads", args.threads))
                       if value is not None and value != "cpu")
    result["command"] = command  # so `bench readme` can quote it later
    if args.json:
        write_json(args.json, result)
    table = write_markdown(name, result, args.markdown)
    if args.readme:
        update_readme(args.readme, name, table, command)
    print(table)


def _command(name: str, args: argparse.Namespace, flags: tuple[str, ...]) -> str:
    """The command line that reproduces a result: ``multitoken bench NAME`` + the given flags
    (attribute names; lists are space-joined, None is left out)."""
    parts = [f"multitoken bench {name}"]
    for flag in flags:
        value = getattr(args, flag)
        if value is not None:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            parts.append(f"--{flag.replace('_', '-')} {shown}")
    return " ".join(parts)


def _run_worker_bench(name: str, bench, kwargs: dict, args: argparse.Namespace, flags: tuple[str, ...]) -> int:
    """bench memory / train: check outputs, run in a worker (a crash is one line, exit 1), write and print."""
    from multitoken.measure.worker import BenchWorkerError

    check_outputs(args.json, args.markdown, args.readme)
    try:
        result = bench(**kwargs, device=args.device, isolate=not args.in_process, threads=args.threads,
                       progress=None if args.quiet else progress_line)
    except BenchWorkerError as e:
        print(f"error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 1
    _bench_outputs(name, result, args, _command(name, args, flags))
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    from multitoken.measure.memory import bench_memory

    kwargs = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer, seq_len=args.seq_len,
                  batch_size=args.batch_size, head_type=args.head_type, n_futures=args.n_future,
                  repeats=args.repeats, chunk_size=args.chunk_size)
    return _run_worker_bench("memory", bench_memory, kwargs, args, (
        "vocab_size", "d_model", "n_layer", "seq_len", "batch_size", "head_type", "n_future", "chunk_size", "repeats"))


def cmd_bench_train(args: argparse.Namespace) -> int:
    from multitoken.measure.train_step import bench_train

    kwargs = dict(vocab_size=args.vocab_size, d_model=args.d_model, n_layer=args.n_layer, n_head=args.n_head,
                  seq_len=args.seq_len, batch_size=args.batch_size, head_types=args.head_type,
                  n_futures=args.n_future, backward=args.backward, repeats=args.repeats)
    return _run_worker_bench("train", bench_train, kwargs, args, (
        "vocab_size", "d_model", "n_layer", "n_head", "seq_len", "batch_size", "n_future", "backward", "repeats",
        "head_type"))


def cmd_bench_readme(args: argparse.Namespace) -> int:
    from multitoken.measure.tables import load_result, update_readme, write_markdown

    folder = Path(args.dir)
    readme = Path(args.readme) if args.readme else folder / "README.md"
    check_outputs(readme)
    names = [n for n in ("memory", "train") if (folder / f"{n}.json").exists()]
    if not names:
        raise MultitokenError(f"no memory.json or train.json in {folder}")
    for name in names:
        result = load_result(folder / f"{name}.json")
        update_readme(readme, name, write_markdown(name, result), result.get("command"))
    print(f"updated {readme}: {', '.join(names)}")
    return 0


def cmd_bench_decode(args: argparse.Namespace) -> int:
    from multitoken.measure.decode_run import HF_VERIFY_WIDTHS
    if args.base:  # an HF base: side by side with HF greedy and prompt lookup, verify cost at HF widths
        widths = HF_VERIFY_WIDTHS if args.verify_widths else ()
        return run_decode_command(args, ["hf_pld", *args.modes], args.draft_cost is not None, widths, None, False)
    return run_decode_command(args, args.modes, False, args.verify_widths, args.prompt_tokens, False)


def add_bench_decode(bsub: argparse._SubParsersAction) -> None:
    d = bsub.add_parser("decode", help="plain vs self-speculative vs draft-model (vs tree) decoding, greedy")
    d.add_argument("--model", help="trained multitoken checkpoint or run directory")
    d.add_argument("--base", help="Hugging Face base ('smollm2' or a model folder / .gguf file)")
    d.add_argument("--heads", help="MTP heads for --base: a folder or a shipped name (default: the heads shipped "
                                   "for --base)")
    d.add_argument("--modes", nargs="+", default=["ar", "spec", "draft", "tree"], help="modes to compare")
    d.add_argument("--draft-model", help="draft model checkpoint for the draft mode")
    d.add_argument("--num-draft", type=int, help="draft tokens per step")
    d.add_argument("--tree", help="static tree (JSON paths or preset) for the tree mode")
    d.add_argument("--tree-budget", type=int, help="dynamic tree node budget for the tree mode")
    d.add_argument("--prompts", type=int, default=16, help="validation prompts (default 16)")
    d.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    add_batch_flags(d)
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--json", help="write the rows as JSON")
    d.add_argument("--markdown", help="write the markdown table")
    d.add_argument("--readme", help="update the decode section of this README (e.g. bench/README.md)")
    d.add_argument("--verify-widths", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                   help="also time one verify pass per block width (tree nodes + 1); none to skip")
    hf = d.add_argument_group("with --base (same as `heads bench`: HF greedy and prompt lookup rows, chat prompts, "
                              "each group reported separately)")
    add_bench_prompt_flags(hf)
    hf.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for HF (default 10)")
    add_decode_path_flags(hf)
    add_draft_cost_flag(hf, default=None)  # given: an extra "chain, adaptive k" row
    d.set_defaults(func=cmd_bench_decode)


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
    add_bench_decode(bsub)
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
