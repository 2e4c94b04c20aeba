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
    from multitoken.measure.bench import update_readme, write_markdown
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
    from multitoken.measure.bench import BenchWorkerError, bench_memory
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
    from multitoken.measure.bench import BenchWorkerError, bench_train
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
    from multitoken.measure.bench import load_result, update_readme, write_markdown
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
    add_bench_decode(bsub)  # decoding benchmark: see the generate section
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
    from multitoken.measure.analysis import analyze, format_analysis
    from multitoken.model.config import MTPConfig
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
    from multitoken.measure.report import render_report
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


# ---------------------------------------------------------------------------- train
def _train_overrides(args: argparse.Namespace) -> dict:
    """Flags -> TrainConfig overrides (only the flags that were given)."""
    from multitoken.training.trainer import parse_set

    out = parse_set(args.set or [])
    model = out.setdefault("model", {})
    for flag, key in (("n_future", "n_future"), ("head_type", "head_type")):
        if getattr(args, flag) is not None:
            model[key] = getattr(args, flag)
    if not model:
        del out["model"]
    simple = {"data": "data", "tokenizer": "tokenizer", "vocab_size": "bpe_vocab_size",
              "batch_size": "micro_batch_size", "grad_accum": "grad_accum", "seq_len": "seq_len",
              "lr": "lr", "weighting": "weighting", "device": "device", "dtype": "dtype", "seed": "seed"}
    for flag, key in simple.items():
        if getattr(args, flag) is not None:
            out[key] = getattr(args, flag)
    if args.steps is not None:
        out.update(max_steps=args.steps, max_tokens=None)
    if args.max_tokens is not None:
        out.update(max_tokens=args.max_tokens, max_steps=None)
    if args.compile:
        out["compile"] = True
    return out


class _OneLineWarnings:
    """Show warnings (e.g. non-UTF-8 bytes replaced) as one `warning: ...` line on stderr."""

    def __enter__(self):
        import warnings
        self._saved = warnings.showwarning
        warnings.showwarning = lambda message, category, *rest, **kw: print(
            f"warning: {str(message).splitlines()[0]}", file=sys.stderr)
        return self

    def __exit__(self, *exc):
        import warnings
        warnings.showwarning = self._saved


def _launch_local(args: argparse.Namespace) -> int:
    """``multitoken train --nproc N ...``: run ``torchrun --standalone --nproc-per-node N -m
    multitoken train ...`` (the same arguments minus --nproc) in this process."""
    import os

    if os.environ.get("RANK") is not None:
        raise UsageError("--nproc spawns torchrun itself; inside torchrun drop --nproc")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    argv = sys.argv[1:]
    if vars(build_parser().parse_args(argv)) != vars(args):
        raise UsageError("--nproc works from the command line only; call torchrun yourself")
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    launch = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={args.nproc}",
                                           "--max-restarts=0", "-m", "multitoken", *rest])
    try:
        run(launch)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
        if code not in (2, 130):  # 2 and 130: the rank already said why in one line
            print(f"error: training failed on rank {rank} (exit code {failure.exitcode}); see its "
                  "messages above", file=sys.stderr)
        return code
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    import os

    from multitoken.training.checkpoint import CheckpointNotFoundError, find_checkpoint, read_train_config
    from multitoken.training.trainer import MTPTrainer, build_config

    if args.nproc is not None:
        return _launch_local(args)
    # Under torchrun (WORLD_SIZE > 1) data-parallel training is the point: DDP unless told otherwise.
    parallel = args.parallel or ("ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None)
    out = Path(args.out or f"runs/{args.preset or 'train'}")
    base, preset = None, args.preset
    if args.resume:
        ckpt = find_checkpoint(out)
        if ckpt is None:
            raise CheckpointNotFoundError(f"nothing to resume: no checkpoint in {out}")
        base = read_train_config(ckpt)  # the run's own config; --preset/--config/flags override it
    elif preset is None and args.config is None:
        preset = "small"
    config = build_config(preset, args.config, _train_overrides(args), base=base)
    with _OneLineWarnings():
        trainer = MTPTrainer.from_config(config, out, resume=args.resume, progress=not args.no_progress,
                                         parallel=parallel)
    try:
        return _run_training(trainer, config, args, out)
    finally:
        trainer.shutdown()  # leaves the process group under torchrun


def _run_training(trainer, config, args: argparse.Namespace, out: Path) -> int:
    from multitoken.training.trainer import TrainingDiverged, format_head_table

    main_rank = trainer.rank == 0  # only rank 0 talks
    n = trainer.model.num_parameters()
    where = f"{trainer.device}" + (f" x {trainer.world_size} ranks ({trainer.parallel.kind})"
                                   if trainer.parallel is not None else "")
    if main_rank:
        print(f"model: {n['total']:,} parameters (trunk {n['trunk']:,}, heads {n['heads']:,}), "
              f"n_future={trainer.model.cfg.n_future}, head_type={trainer.model.cfg.head_type}; "
              f"data: {len(trainer.train_data):,} train sequences of {config.seq_len} tokens; "
              f"{trainer.total_steps} steps of {config.tokens_per_step(trainer.world_size):,} tokens on {where}"
              + (f"; resuming at step {trainer.step}" if args.resume else ""), file=sys.stderr)
    try:
        result = trainer.fit()
    except TrainingDiverged as e:
        if main_rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    if not main_rank:
        return 130 if result["status"] == "interrupted" else 0
    if result["status"] == "interrupted":
        print(f"interrupted at step {result['step']}; checkpoint saved to {result['checkpoint']}; "
              f"continue with: multitoken train --out {out} --resume", file=sys.stderr)
        return 130 if result["signal"] in (None, 2) else 128 + int(result["signal"])
    if result["eval"] is not None:
        print(format_head_table(result["eval"]))
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train an MTP model (presets, YAML/JSON config, checkpoints, --resume)",
        description="Train an MTP model. Settings come from, in increasing priority: the preset, the "
                    "--config file, then --set and the other flags. With --resume the run's saved config "
                    "is the base instead of a preset.")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of TrainConfig fields (model fields under 'model:')")
    p.add_argument("--preset", metavar="NAME", help="tiny (tests, seconds) | small (CPU demo, minutes; the default) "
                                                    "| base (a GPU run)")
    p.add_argument("--out", metavar="DIR", help="run directory: checkpoint/, metrics.jsonl (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--data", nargs="+", metavar="PATH", help="text files, folders (recursive) or JSONL with a "
                                                             "'text' field (default: the Python stdlib sources)")
    p.add_argument("--tokenizer", metavar="KIND", help="byte (default) or bpe (trained on the training split)")
    p.add_argument("--vocab-size", type=int, metavar="N", help="BPE vocabulary size (with --tokenizer bpe)")
    p.add_argument("--n-future", type=int, metavar="N", help="tokens predicted per position (1 = plain LM)")
    p.add_argument("--head-type", metavar="T", help="linear | residual | modulated | transformer | sequential")
    p.add_argument("--weighting", metavar="W", help="loss weighting: tutorial | uniform | deepseek")
    p.add_argument("--steps", type=int, metavar="N", help="optimizer steps to train (replaces max_tokens)")
    p.add_argument("--max-tokens", type=int, metavar="N", help="train on this many tokens (replaces --steps)")
    p.add_argument("--batch-size", type=int, metavar="N", help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per optimizer step")
    p.add_argument("--seq-len", type=int, metavar="N", help="tokens per training sequence")
    p.add_argument("--lr", type=float, metavar="F", help="peak learning rate")
    p.add_argument("--device", metavar="D", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", metavar="T", help="autocast dtype: auto | float32 | bfloat16")
    p.add_argument("--compile", action="store_true", help="torch.compile the training step")
    p.add_argument("--seed", type=int, metavar="N", help="seed of the model init and the data order")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any TrainConfig field, e.g. --set eval_every=50 --set model.d_model=128 "
                        "(repeatable; values parsed as YAML)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--parallel", choices=("ddp", "fsdp"),
                   help="data-parallel mode under torchrun: ddp (a replica per rank; the default when "
                        "WORLD_SIZE > 1) or fsdp (FSDP2: weights, gradients, optimizer state sharded)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="spawn N local ranks with torchrun (torch.distributed.run --standalone "
                        "--nproc-per-node N -m multitoken train ...); global batch = batch size x "
                        "grad accum x N")
    p.set_defaults(func=cmd_train)


# ---------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from multitoken.training.checkpoint import read_eval
    from multitoken.training.trainer import format_head_table, train_demo_model

    with _OneLineWarnings():
        ckpt = train_demo_model(args.out, steps=args.steps, device=args.device, progress=not args.no_progress)
    ev = read_eval(ckpt)
    print(f"model: {ckpt}")
    if ev is not None:
        print("per-head validation metrics (head i predicts token t+i+1):")
        print(format_head_table(ev))
    return demo_decode(ckpt)


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


# ---------------------------------------------------------------------------- generate
def _load_decoder(args: argparse.Namespace):
    """-> (model implementing the decode protocol, tokenizer with encode/decode/eos_id)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "base", None):
        from multitoken.hf.wrapper import load_heads_model
        return load_heads_model(args.base, args.heads, fast_kernels=not args.no_fast_kernels,
                                fast_forward=not args.hf_forward)
    if not args.model:
        raise UsageError("give --model DIR (a trained multitoken checkpoint) or --base/--heads")
    from multitoken.training.checkpoint import load_model
    return load_model(args.model)


def _prompt_text(args: argparse.Namespace) -> str:
    if args.prompt_file:
        raw = Path(args.prompt_file).read_bytes()
        text = raw.decode("utf-8", errors="replace")
        if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
            print(f"warning: {args.prompt_file} is not valid UTF-8; undecodable bytes were replaced", file=sys.stderr)
        return text
    if args.prompt is None:
        raise UsageError("give --prompt TEXT or --prompt-file FILE")
    return args.prompt


class _TextStream:
    """Print text as tokens are accepted; hold back an incomplete UTF-8 character."""

    def __init__(self, tokenizer, out=None):
        self.tokenizer, self.out, self.ids, self.shown = tokenizer, out or sys.stdout, [], 0

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.ids.extend(tokens)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.shown:])
        self.out.flush()
        self.shown = len(text)

    def finish(self) -> None:
        self.out.write(self.tokenizer.decode(self.ids)[self.shown:] + "\n")
        self.out.flush()


def _tree_for(args: argparse.Namespace, model):
    """--mode tree: the --tree given, else the tree tuned next to the model, else the default
    preset; None when --tree-budget asks for dynamic trees."""
    if getattr(args, "tree_budget", None) is not None:
        if args.tree is not None:
            raise UsageError("give either --tree or --tree-budget, not both")
        return None
    from multitoken.decoding.tree import resolve_tree
    model_dir = None
    if getattr(args, "model", None):
        from multitoken.training.checkpoint import resolve_checkpoint
        model_dir = resolve_checkpoint(args.model)
    elif getattr(args, "heads", None):
        model_dir = args.heads
    return resolve_tree(args.tree, model_dir, model.n_future - 1)


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from multitoken.decoding.generate import generate

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    model, tokenizer = _load_decoder(args)
    text = _prompt_text(args)
    if args.chat:
        from multitoken.hf.loading import apply_chat_template_or_fail
        ids = tokenizer.encode(apply_chat_template_or_fail(getattr(tokenizer, "hf", tokenizer), text))
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise UsageError("empty prompt: it encodes to no tokens")
    draft_model = None
    if args.mode == "draft":
        if not args.draft_model:
            raise UsageError("--mode draft needs --draft-model DIR")
        from multitoken.training.checkpoint import load_model
        draft_model, _ = load_model(args.draft_model)
    eos = None if args.no_eos else getattr(tokenizer, "eos_id", None)
    if eos is None and not args.no_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
    stream = _TextStream(tokenizer) if not args.quiet else None
    tree = _tree_for(args, model) if args.mode == "tree" else None

    def run(max_new: int, on_tokens=None):
        return generate(model, [torch.tensor(ids)], max_new, mode=args.mode, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, draft_model=draft_model, num_draft=args.num_draft,
                        eos_id=eos, seed=args.seed, tree=tree, tree_budget=args.tree_budget, on_tokens=on_tokens,
                        truncate=args.truncate, draft_cost=args.draft_cost)

    if args.compare:  # one-time costs (first-call allocations, oneDNN weight reorders) must not count
        run(2)
    result = run(args.max_new_tokens, stream)
    if stream:
        stream.finish()
    stats = result.stats.to_dict()
    report = {"mode": args.mode, **stats}
    if args.compare:
        plain = generate(model, [torch.tensor(ids)], args.max_new_tokens, eos_id=eos, truncate=args.truncate)
        report["identical"] = plain.tokens == result.tokens if args.temperature == 0 else None
        report["plain_tokens_per_s"] = plain.stats.tokens_per_s
        report["speedup"] = stats["tokens_per_s"] / max(plain.stats.tokens_per_s, 1e-9)
    _print_stats(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_stats(r: dict) -> None:
    acc = " ".join(f"{a:.2f}" for a in r.get("acceptance_rates", []))
    line = (f"[{r['mode']}] {r['new_tokens']} tokens in {r['wall_s']:.2f}s ({r['tokens_per_s']:.1f} tok/s), "
            f"{r['forward_passes']} forward passes, tau={r['tau']:.2f}")
    if acc:
        line += f", acceptance per head: {acc}"
    if "speedup" in r:
        ident = {True: "yes", False: "NO", None: "n/a (sampling)"}[r["identical"]]
        line += f"; vs plain: {r['speedup']:.2f}x, identical: {ident}"
    print(line, file=sys.stderr)


DEMO_PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):\n    \"\"\"Parse the command line.\"\"\"\n"


def demo_decode(ckpt, prompt: str = DEMO_PROMPT, max_new_tokens: int = 256) -> int:
    """The demo's second half: the same prompt decoded plainly, self-speculatively and with a
    tree, in one process; prints the text, tau, acceptance per head, speed-ups, identity."""
    import torch
    from multitoken.training.checkpoint import load_model
    from multitoken.decoding.generate import generate
    from multitoken.decoding.tree import resolve_tree

    model, tokenizer = load_model(ckpt)
    ids = [torch.tensor(tokenizer.encode(prompt))]
    max_new_tokens = min(max_new_tokens, model.max_seq_len - len(ids[0]))
    generate(model, ids, 8)  # warm-up, so first-call allocations are not timed
    plain = generate(model, ids, max_new_tokens, eos_id=tokenizer.eos_id)
    rows = [("plain", plain)]
    if model.n_future > 1:
        rows.append(("self-speculative", generate(model, ids, max_new_tokens, mode="spec", eos_id=tokenizer.eos_id)))
        tree = resolve_tree(None, ckpt, model.n_future - 1)
        rows.append(("tree", generate(model, ids, max_new_tokens, mode="tree", tree=tree, eos_id=tokenizer.eos_id)))
    sampled = {}
    if model.n_future > 1:  # greedy text of a minutes-old byte model degenerates; sampling shows more
        kw = dict(temperature=0.8, top_p=0.95, eos_id=tokenizer.eos_id, seed=0)
        sampled = {"plain, sampled T=0.8": generate(model, ids, max_new_tokens, **kw),
                   "spec, sampled T=0.8": generate(model, ids, max_new_tokens, mode="spec", **kw)}
    print("\nprompt + greedy continuation:\n" + "-" * 60)
    print(prompt + tokenizer.decode(plain.tokens[0]))
    if sampled:
        print("-" * 60 + "\nthe same prompt, lossless speculative sampling (T=0.8, top-p 0.95):\n" + "-" * 60)
        print(prompt + tokenizer.decode(sampled["spec, sampled T=0.8"].tokens[0]))
    print("-" * 60)
    print(f"{'decoder':<22}{'tokens':>7}{'passes':>8}{'tau':>7}{'tok/s':>9}{'speed-up':>10}  identical  acceptance per head")
    for name, r in rows:
        st = r.stats
        acc = " ".join(f"{a:.2f}" for a in st.acceptance_rates) or "-"
        same = "yes" if r.tokens == plain.tokens else "NO"
        print(f"{name:<22}{st.new_tokens:>7}{st.forward_passes:>8}{st.tau:>7.2f}{st.tokens_per_s:>9.1f}"
              f"{st.tokens_per_s / plain.stats.tokens_per_s:>9.2f}x  {same:<9}  {acc}")
    if sampled:
        base = sampled["plain, sampled T=0.8"].stats.tokens_per_s
        for name, r in sampled.items():
            st = r.stats
            acc = " ".join(f"{a:.2f}" for a in st.acceptance_rates) or "-"
            print(f"{name:<22}{st.new_tokens:>7}{st.forward_passes:>8}{st.tau:>7.2f}{st.tokens_per_s:>9.1f}"
                  f"{st.tokens_per_s / base:>9.2f}x  {'n/a':<9}  {acc}")
        print("(sampled rows: speed-up vs plain sampling; outputs differ token by token but share one distribution)")
    return 0 if all(r.tokens == plain.tokens for _, r in rows) else 1


def _add_draft_cost_flag(parser, default: float | None = 0.1) -> None:
    parser.add_argument("--draft-cost", type=float, default=default, metavar="C",
                        help="adaptive draft length: one more draft costs C plain steps; each step verifies the "
                             "number of drafts with the best expected tokens per cost (multitoken.draft_length)")


def _add_decode_path_flags(parser) -> None:
    parser.add_argument("--no-fast-kernels", action="store_true",
                        help="keep F.linear in the base's decode passes (default on CPU: oneDNN reordered weights, "
                             "see multitoken.kernels)")
    parser.add_argument("--hf-forward", action="store_true",
                        help="decode through the base's own HF forward and DynamicCache (default for Llama-family "
                             "bases: the lean forward over a static cache, see multitoken.hf_forward)")


def add_generate(sub: argparse._SubParsersAction) -> None:
    from multitoken.decoding.generate import MODES
    g = sub.add_parser("generate", help="generate text: plain, self-speculative, draft-model or tree decoding")
    g.add_argument("--model", help="trained multitoken checkpoint or run directory")
    g.add_argument("--base", help="Hugging Face base model: 'smollm2' or a folder/GGUF path (with --heads)")
    g.add_argument("--heads", help="directory of MTP heads trained for --base")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file (UTF-8; bad bytes replaced)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_decode_path_flags(g)
    g.add_argument("--mode", choices=MODES, default="spec", help="decoding algorithm (default: spec)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--num-draft", type=int, help="draft tokens per step (default: all heads; 4 for --mode draft)")
    _add_draft_cost_flag(g, default=None)
    g.add_argument("--draft-model", help="checkpoint of the draft model for --mode draft")
    g.add_argument("--tree", help="tree for --mode tree: JSON list of paths, e.g. '[[0],[1],[0,0]]', or a preset name")
    g.add_argument("--tree-budget", type=int, help="build the tree dynamically each step with this many nodes")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    g.add_argument("--truncate", choices=["left"], help="drop the oldest prompt tokens that do not fit the context")
    g.add_argument("--compare", action="store_true", help="also run plain greedy decoding: identical? speed-up?")
    g.add_argument("--json", help="write the stats (tau, acceptance_rates, speedup, identical, ...) to this file")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="do not stream the text, print only the stats")
    g.set_defaults(func=cmd_generate)


def cmd_bench_decode(args: argparse.Namespace) -> int:
    import time
    if args.base:  # a Hugging Face base: side by side with HF greedy and prompt lookup on chat prompts
        decoders = ["hf", "hf_pld"] + [m for m in args.modes if m in ("ar", "spec", "tree")]
        if args.draft_cost is not None and "spec" in decoders:
            decoders.insert(decoders.index("spec") + 1, "spec_adaptive")
        return cmd_heads_bench(argparse.Namespace(
            base=args.base, heads=args.heads, code_prompts=args.code_prompts, prose=args.prose,
            prose_prompts=args.prose_prompts, decoders=decoders, max_new_tokens=args.max_new_tokens,
            num_draft=args.num_draft, tree=args.tree, pld_tokens=args.pld_tokens, verify_cost=bool(args.verify_widths),
            no_fast_kernels=args.no_fast_kernels, hf_forward=args.hf_forward, draft_cost=args.draft_cost,
            threads=args.threads, json=args.json, markdown=args.markdown, quiet=False))
    from multitoken.data.prompts import validation_prompts
    from multitoken.measure.decode import bench_decode, machine_description, markdown_table, verify_cost_table

    model, tokenizer = _load_decoder(args)
    draft_model = None
    modes = list(args.modes)
    if args.draft_model:
        from multitoken.training.checkpoint import load_model
        draft_model, _ = load_model(args.draft_model)
    elif "draft" in modes:
        modes.remove("draft")
        print("note: no --draft-model given, skipping the draft mode", file=sys.stderr)
    prompts = validation_prompts(tokenizer, args.prompts, args.prompt_tokens)
    rows = bench_decode(model, prompts, modes, args.max_new_tokens, draft_model=draft_model,
                        num_draft=args.num_draft, tree=_tree_for(args, model) if "tree" in modes else None,
                        tree_budget=args.tree_budget)
    table = markdown_table(rows, f"decode: {args.model or args.base}")
    result = {"benchmark": "decode", "model": args.model or args.base, "machine": machine_description(),
              "date": time.strftime("%Y-%m-%d"), "rows": rows}
    if args.verify_widths:
        from multitoken.decoding.tree import verify_cost_by_width
        result["verify_cost"] = verify_cost_by_width(model, args.verify_widths, prefix_len=args.prompt_tokens)
        table += verify_cost_table(result["verify_cost"])
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.readme:
        from multitoken.measure.bench import update_readme
        command = "multitoken bench decode " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "decode"] else None
        update_readme(args.readme, "decode", table, command)
    return 0 if all(r["identical"] for r in rows) else 1


def add_bench_decode(bsub: argparse._SubParsersAction) -> None:
    d = bsub.add_parser("decode", help="plain vs self-speculative vs draft-model (vs tree) decoding, greedy")
    d.add_argument("--model", help="trained multitoken checkpoint or run directory")
    d.add_argument("--base", help="Hugging Face base ('smollm2' or a path), with --heads")
    d.add_argument("--heads", help="MTP heads directory for --base")
    d.add_argument("--modes", nargs="+", default=["ar", "spec", "draft", "tree"], help="modes to compare")
    d.add_argument("--draft-model", help="draft model checkpoint for the draft mode")
    d.add_argument("--num-draft", type=int, help="draft tokens per step")
    d.add_argument("--tree", help="static tree (JSON paths or preset) for the tree mode")
    d.add_argument("--tree-budget", type=int, help="dynamic tree node budget for the tree mode")
    d.add_argument("--prompts", type=int, default=16, help="validation prompts (default 16)")
    d.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    d.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt (default 128)")
    d.add_argument("--threads", type=int, help="torch CPU threads")
    d.add_argument("--json", help="write the rows as JSON")
    d.add_argument("--markdown", help="write the markdown table")
    d.add_argument("--readme", help="update the decode section of this README (e.g. bench/README.md)")
    d.add_argument("--verify-widths", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32],
                   help="also time one verify pass per block width (tree nodes + 1); none to skip")
    hf = d.add_argument_group("with --base (same as `heads bench`: HF greedy and prompt lookup rows, chat prompts)")
    hf.add_argument("--code-prompts", type=int, default=10, help="code prompts from the stdlib validation split")
    hf.add_argument("--prose", metavar="FILE", help="prose prompts, one per line (default: 12 built-in requests)")
    hf.add_argument("--prose-prompts", type=int, default=10, help="prose prompts used (default 10)")
    hf.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for HF (default 10)")
    _add_decode_path_flags(hf)
    _add_draft_cost_flag(hf, default=None)  # given: an extra "chain, adaptive k" row
    d.set_defaults(func=cmd_bench_decode)


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from multitoken.data.prompts import validation_prompts
    from multitoken.training.checkpoint import resolve_checkpoint
    from multitoken.decoding.tree import build_tree, expected_accept_length, measure_topk_acceptance, save_tree

    model, tokenizer = _load_decoder(args)
    prompts = validation_prompts(tokenizer, args.prompts, args.prompt_tokens)
    top_k = min(args.top_k or min(args.budget, 10), model.vocab_size)
    acc = measure_topk_acceptance(model, prompts, None, top_k, args.max_new_tokens)
    paths = build_tree(acc, args.budget)
    out_dir = resolve_checkpoint(args.model) if args.model else Path(args.heads)
    path = save_tree(paths, out_dir, acceptance=acc.tolist(), budget=args.budget)
    for j, row in enumerate(acc.tolist(), start=1):
        print(f"head {j}: top-{top_k} acceptance " + " ".join(f"{a:.2f}" for a in row))
    print(f"tree of {len(paths)} nodes, expected tau {expected_accept_length(paths, acc):.2f}: {json.dumps(paths)}")
    print(f"saved to {path} (used by --mode tree by default)")
    return 0


def add_tune_tree(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tune-tree", help="measure per-head top-k acceptance and save the best static tree for a budget")
    t.add_argument("--model", help="trained multitoken checkpoint or run directory")
    t.add_argument("--base", help="Hugging Face base ('smollm2' or a path), with --heads")
    t.add_argument("--heads", help="MTP heads directory for --base (the tree is saved there)")
    t.add_argument("--budget", type=int, required=True, help="tree nodes (candidates verified per step)")
    t.add_argument("--top-k", type=int, help="candidates measured per head (default min(budget, 10))")
    t.add_argument("--prompts", type=int, default=16, help="validation prompts (default 16)")
    t.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    t.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens decoded per prompt (default 64)")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.set_defaults(func=cmd_tune_tree)


# ---------------------------------------------------------------------------- main
# ---------------------------------------------------------------------------- heads (HF base + MTP heads)
def cmd_heads_train(args: argparse.Namespace) -> int:
    from multitoken.training.heads import HeadsTrainConfig, run_heads_train

    cfg = HeadsTrainConfig(n_future=args.n_future, head_type=args.head_type, targets=args.targets,
                           draft_vocab=args.draft_vocab, epochs=args.epochs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, warmup=args.warmup, seed=args.seed,
                           max_minutes=args.minutes, eval_every=args.eval_every, tree_budget=args.tree_budget,
                           d_ff=args.d_ff)
    s = run_heads_train(args.base, args.data, args.out, cfg, cache_dir=args.cache, max_tokens=args.max_tokens,
                        seq_len=args.seq_len, generate_distill=args.generate_distill, threads=args.threads,
                        progress=not args.quiet, train_base_layers=args.train_base_layers,
                        lora_rank=args.lora_rank)
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
    import platform

    from multitoken.measure.decode import machine_description
    from multitoken.data.prompts import CODE_INSTRUCTION, PROSE_PROMPTS, code_snippets, interleave, read_prompts
    from multitoken.hf.loading import chat_ids
    from multitoken.measure.decode_hf import bench_hf_decode, markdown, verify_costs
    from multitoken.decoding.tree import resolve_tree

    model, tok = _load_decoder(args)
    hf = tok.hf
    code = [("code", chat_ids(hf, CODE_INSTRUCTION.format(code=c))) for c in code_snippets(hf, args.code_prompts)]
    texts = read_prompts(args.prose) if args.prose else PROSE_PROMPTS
    prose = [("prose", chat_ids(hf, p)) for p in texts[:args.prose_prompts]]
    prompts = list(interleave(code, prose, 2))  # alternating: an interrupted run still covers both halves
    tree = resolve_tree(args.tree, args.heads, model.n_future - 1) if "tree" in args.decoders else None
    verify = verify_costs(model, [1, 2, 3, 4, 8, 16]) if args.verify_cost else None
    result = bench_hf_decode(model, hf, prompts, args.max_new_tokens, args.decoders, args.num_draft, tree,
                             args.pld_tokens, progress=not args.quiet,
                             partial=args.json + ".partial" if args.json else None, draft_cost=args.draft_cost)
    result.update(verify_cost=verify, machine=machine_description(), python=platform.python_version(),
                  base=args.base, heads=args.heads, tree=tree if not hasattr(tree, "paths") else tree.paths,
                  decode_path={"lean_forward": model.lean_forward is not None, "fast_kernels": model.fast_kernels})
    path = " + ".join(n for n, on in (("lean forward", model.lean_forward is not None),
                                      ("oneDNN kernels", model.fast_kernels)) if on) or "HF forward, F.linear"
    table = markdown(result, f"decode: {args.base} + heads {args.heads}", f"{result['machine']}; {path}", verify)
    print(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        Path(args.json + ".partial").unlink(missing_ok=True)  # the finished run supersedes it
    if args.markdown:
        Path(args.markdown).write_text(table)
    return 0 if all(r["identical"] for r in result["rows"] if r["decoder"] != "hf_pld") else 1


def add_heads(sub: argparse._SubParsersAction) -> None:
    from multitoken.measure.decode_hf import DECODERS
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
                        "prose requests in the chat template; else corpus continuations) and cache those first")
    t.add_argument("--train-base-layers", type=int, default=0, metavar="N",
                   help="also train the base's top N layers (Medusa-2 style; the output then follows the "
                        "adapted base, not the original)")
    t.add_argument("--lora-rank", type=int, default=0, metavar="R",
                   help="with --train-base-layers: LoRA adapters of rank R (peft) instead of full layers")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_heads_train)

    b = hsub.add_parser("bench", help="HF greedy vs HF prompt lookup vs multitoken plain/chain/tree on chat prompts")
    b.add_argument("--base", required=True, help="'smollm2' or a Hugging Face model folder / .gguf file")
    b.add_argument("--heads", required=True, metavar="DIR", help="heads trained with `heads train`")
    b.add_argument("--code-prompts", type=int, default=10, help="code prompts from the stdlib validation split")
    b.add_argument("--prose", metavar="FILE", help="prose prompts, one per line (default: 12 built-in requests)")
    b.add_argument("--prose-prompts", type=int, default=10, help="prose prompts used (default 10)")
    b.add_argument("--decoders", nargs="+", default=["hf", "hf_pld", "ar", "spec", "tree"],
                   choices=DECODERS,
                   help="spec_adaptive: the chain with each step's draft length chosen at --draft-cost")
    _add_draft_cost_flag(b)
    b.add_argument("--max-new-tokens", type=int, default=128)
    b.add_argument("--num-draft", type=int, help="draft tokens per step (default: all heads)")
    b.add_argument("--tree", help="static tree for the tree decoder (preset, JSON paths; default: tree.json "
                                  "next to the heads, else the medium preset)")
    b.add_argument("--pld-tokens", type=int, default=10, help="prompt_lookup_num_tokens for HF (default 10)")
    b.add_argument("--verify-cost", action="store_true", help="also time one verify pass per width 1..16")
    _add_decode_path_flags(b)
    b.add_argument("--threads", type=int, help="torch CPU threads")
    b.add_argument("--json", help="write rows + per-prompt results as JSON")
    b.add_argument("--markdown", help="write the markdown table")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_heads_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="multitoken", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_bench(sub)
    add_analyze(sub)
    add_report(sub)
    add_train(sub)
    add_generate(sub)
    add_tune_tree(sub)
    add_demo(sub)
    add_heads(sub)
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
