"""``multitoken train``: one run, or --nproc local ranks through torchrun."""
from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path

from multitoken.cli.common import OneLineWarnings, UsageError


def _train_overrides(args: argparse.Namespace) -> dict:
    """Flags -> TrainConfig overrides (only the flags that were given)."""
    from multitoken.training import parse_set

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


def _launch_local(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``multitoken train --nproc N ...``: run ``torchrun --standalone --nproc-per-node N -m
    multitoken train ...`` (the same arguments minus --nproc) in this process."""
    if os.environ.get("RANK") is not None:
        raise UsageError("--nproc spawns torchrun itself; inside torchrun drop --nproc")
    if args.nproc < 1:
        raise UsageError(f"--nproc must be >= 1, got {args.nproc}")
    argv = sys.argv[1:]
    if vars(parser.parse_args(argv)) != vars(args):
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


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from multitoken.training import (CheckpointNotFoundError, MTPTrainer, build_config, find_checkpoint,
                                     read_train_config)

    if args.nproc is not None:
        return _launch_local(args, parser)
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
    with OneLineWarnings():
        trainer = MTPTrainer.from_config(config, out, resume=args.resume, progress=not args.no_progress,
                                         parallel=parallel)
    try:
        code = _run_training(trainer, config, args, out)
    except BaseException:
        trainer.shutdown()  # leaves the process group under torchrun
        raise
    trainer.shutdown(finished=True)
    return code


def _run_training(trainer, config, args: argparse.Namespace, out: Path) -> int:
    from multitoken.training import TrainingDiverged, format_head_table

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
    if result["kept"]:
        print(_kept_line(result["kept"], result["checkpoint"]))
    if result["status"] == "interrupted":
        print(f"interrupted at step {result['step']}; checkpoint saved to {result['checkpoint']}; "
              f"continue with: multitoken train --out {out} --resume", file=sys.stderr)
        return 130 if result["signal"] in (None, 2) else 128 + int(result["signal"])
    if result["eval"] is not None:
        print(format_head_table(result["eval"]))
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _kept_line(kept: list[str], ckpt) -> str:
    """The files training did not write, carried into the new checkpoint (said once per run)."""
    from multitoken.decoding.tree_presets import TREE_FILE

    line = f"kept in {ckpt} (not written by training, carried over): {', '.join(kept)}"
    if TREE_FILE in kept:
        line += f"; {TREE_FILE} was tuned on earlier weights (multitoken tune-tree refreshes it)"
    return line


def add_train(sub: argparse._SubParsersAction, root: argparse.ArgumentParser) -> None:
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
    p.set_defaults(func=functools.partial(cmd_train, parser=root))
