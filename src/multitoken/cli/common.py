"""What the command modules share: the CLI's error type, model loading from flags, the tree
flags, output checks, and flags used by several commands."""
from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import atomic_write, check_writable, write_json


class UsageError(MultitokenError):
    """A user mistake in the flags: reported as one line, exit 2."""


def check_outputs(*paths: str | Path | None) -> None:
    """Refuse, before any work, output files (--json, --markdown, --readme) that could not be written.
    Missing folders are fine where the nearest existing one is writable (atomic_write creates them)."""
    for path in filter(None, paths):
        check_writable(path)


def library_default(fn, name: str):
    """The default of parameter ``name`` of ``fn`` (so help texts never restate a library default)."""
    return inspect.signature(fn).parameters[name].default


def progress_line(message: str) -> None:
    """A progress message on stderr."""
    print(message, file=sys.stderr, flush=True)


class OneLineWarnings:
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


def load_decoder(args: argparse.Namespace):
    """-> (model implementing the decode protocol, tokenizer with encode/decode/eos_id)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if getattr(args, "base", None):
        from multitoken.hf import load_heads_model
        model, tokenizer = load_heads_model(args.base, args.heads, fast_kernels=not args.no_fast_kernels,
                                            fast_forward=not args.hf_forward)
        if getattr(args, "no_vocab_screen", False):
            model.vocab_screen = None
        return model, tokenizer
    if not args.model:
        raise UsageError("give --model DIR (a trained multitoken checkpoint) or --base/--heads")
    from multitoken.training import load_model
    return load_model(args.model)


def model_dir(args: argparse.Namespace):
    """Where the model's files (tree.json) live: the checkpoint of --model, or --heads."""
    if getattr(args, "model", None):
        from multitoken.training import resolve_checkpoint
        return resolve_checkpoint(args.model)
    return getattr(args, "heads", None)


def tree_for(args: argparse.Namespace, model):
    """--mode tree: the --tree given (parsed), else None: the library's default, the same as
    ``multitoken.generate`` picks (cost-aware from the saved acceptance table, else the saved tree,
    else the preset); also None when --tree-budget asks for dynamic trees."""
    if getattr(args, "tree_budget", None) is not None:
        if args.tree is not None:
            raise UsageError("give either --tree or --tree-budget, not both")
        return None
    if args.tree is None:
        return None
    from multitoken.decoding import resolve_tree
    return resolve_tree(args.tree, model_dir(args), model.n_future - 1, model.vocab_size)


def add_draft_cost_flag(parser, default: float | None = 0.1) -> None:
    parser.add_argument("--draft-cost", type=float, default=default, metavar="C",
                        help="adaptive draft length with a hand-set cost: one more draft costs C plain steps; each "
                             "step verifies the number of drafts with the best expected tokens per cost "
                             "(multitoken.decoding.draft_length; without it, spec uses the measured pass costs)")


def add_decode_path_flags(parser) -> None:
    parser.add_argument("--no-fast-kernels", action="store_true",
                        help="keep F.linear in the base's decode passes (default on CPU: oneDNN reordered weights, "
                             "see multitoken.hf.kernels)")
    parser.add_argument("--no-vocab-screen", action="store_true",
                        help="score the base head in float32 over the whole vocabulary in greedy passes too (default "
                             "where the CPU has native bfloat16: a bfloat16 screen, then float32 logits wherever the "
                             "maximum can be; the same argmax, see multitoken.hf.vocab_screen)")
    parser.add_argument("--hf-forward", action="store_true",
                        help="decode through the base's own HF forward and DynamicCache (default for Llama-family "
                             "bases: the lean forward over a static cache, see multitoken.hf.lean_forward)")


def add_bench_prompt_flags(parser, default_code_prompts: int = 10) -> None:
    """The chat-prompt flags ``bench decode --base`` and ``heads bench`` share."""
    parser.add_argument("--requests", metavar="FILE",
                        help="chat requests: JSONL ({id, group, prompt}) or one prompt per line (default: the "
                             "packaged natural-request set, groups code / complete / prose)")
    parser.add_argument("--prose", metavar="FILE",
                        help="prose requests, one per line, instead of the request set's prose group")
    parser.add_argument("--per-group", type=int, metavar="N", help="at most N requests of each group (default: all)")
    parser.add_argument("--code-prompts", type=int, default=default_code_prompts,
                        help=f"code-continuation prompts from the stdlib validation split, group 'continue' "
                             f"(default {default_code_prompts})")


def add_batch_flags(parser) -> None:
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="decode B prompts of a group at once (HF greedy batched with left padding; identical "
                             "then compares each row with its own single-prompt reference output; default 1)")
    parser.add_argument("--compare-finished", action="store_true",
                        help="also run each multitoken decoder with finished rows kept in the batch (masked) "
                             "instead of dropped, to see which is cheaper")


def run_decode_command(args: argparse.Namespace, modes, adaptive: bool, verify_widths, verify_prefix,
                       quiet: bool) -> int:
    """What ``bench decode`` and ``heads bench`` both do: load, benchmark, print, write the outputs."""
    from multitoken.measure.decode import hf_base as hf_base_of
    from multitoken.measure.decode_run import (all_identical, bench_prompts, choose_decoders, dropped_draft,
                                               run_decode_bench)

    check_outputs(args.json, args.markdown, getattr(args, "readme", None))
    model, tokenizer = load_decoder(args)
    draft_model = None
    if getattr(args, "draft_model", None):
        from multitoken.training import load_model
        draft_model, _ = load_model(args.draft_model)
    if dropped_draft(model, modes, draft_model):
        print("note: no --draft-model given, skipping the draft mode", file=sys.stderr)
    batch_size = args.batch_size
    if batch_size > 1 and "hf_pld" in modes and hf_base_of(model) is not None:
        print("note: HF prompt lookup decodes one prompt at a time, skipping it at --batch-size > 1", file=sys.stderr)
    decoders = choose_decoders(model, modes, draft_model, adaptive, batch_size, args.compare_finished)
    prompts, chat = bench_prompts(model, tokenizer, getattr(args, "prompts", 0), getattr(args, "prompt_tokens", 0),
                                  args.code_prompts, args.requests, args.per_group, args.prose)
    name = getattr(args, "model", None) or f"{args.base} + heads {args.heads or '(shipped)'}"
    partial = args.json + ".partial" if args.json else None
    result, table = run_decode_bench(
        model, tokenizer, name, prompts, chat, decoders, args.max_new_tokens, verify_widths, verify_prefix,
        progress=not quiet, partial=partial, draft_model=draft_model, num_draft=args.num_draft,
        tree=tree_for(args, model) if "tree" in decoders else None, tree_budget=getattr(args, "tree_budget", None),
        draft_cost=args.draft_cost, pld_tokens=args.pld_tokens, batch_size=batch_size)
    print(table)
    if args.json:
        write_json(args.json, result)
        Path(partial).unlink(missing_ok=True)  # the finished run supersedes it
    if args.markdown:
        atomic_write(args.markdown, table)
    if getattr(args, "readme", None):
        from multitoken.measure.tables import update_readme
        command = "multitoken bench decode " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["bench", "decode"] else None
        update_readme(args.readme, "decode", table, command)
    return 0 if all_identical(result) else 1
