"""``multitoken generate`` (stream text, report τ and acceptance) and ``multitoken tune-tree``."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from multitoken.cli.common import (UsageError, add_decode_path_flags, add_draft_cost_flag, check_outputs,
                                   library_default, load_decoder, model_dir, tree_for)
from multitoken.data import parse_prompts
from multitoken.decoding import MODES, tune_tree, tuning_top_k
from multitoken.decoding.lookup import DEFAULT_LOOKUP
from multitoken.io import write_json


def _read_text(path: str) -> str:
    """A prompt file as text: UTF-8, undecodable bytes replaced (with a warning)."""
    raw = Path(path).read_bytes()
    text = raw.decode("utf-8", errors="replace")
    if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
        print(f"warning: {path} is not valid UTF-8; undecodable bytes were replaced", file=sys.stderr)
    return text


def _prompt_list(path: str) -> list[str]:
    """``--prompts FILE``: :func:`multitoken.data.parse_prompts` (one prompt per non-empty line,
    or JSONL with a "prompt" or "text" field) of the file, bad UTF-8 replaced with a warning."""
    return parse_prompts(_read_text(path), path)


def _prompt_texts(args: argparse.Namespace) -> list[str]:
    """The prompts of --prompt, --prompt-file (the whole file is one prompt) or --prompts (several)."""
    given = [f for f, v in (("--prompt", args.prompt), ("--prompt-file", args.prompt_file),
                            ("--prompts", args.prompts)) if v is not None]
    if len(given) > 1:
        raise UsageError(f"give one of --prompt, --prompt-file and --prompts, not {' and '.join(given)}")
    if args.prompts:
        return _prompt_list(args.prompts)
    if args.prompt_file:
        return [_read_text(args.prompt_file)]
    if args.prompt is None:
        raise UsageError("give --prompt TEXT, --prompt-file FILE or --prompts FILE")
    return [args.prompt]


def _encode(tokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        from multitoken.hf import apply_chat_template_or_fail
        return tokenizer.encode(apply_chat_template_or_fail(getattr(tokenizer, "hf", tokenizer), text))
    return tokenizer.encode(text)


def _check_generate_flags(args: argparse.Namespace) -> None:
    """Flags that are wrong whatever the model: refused before anything loads."""
    from multitoken.decoding import check_mode_arguments

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p),
                        ("--draft-cost", args.draft_cost)):
        if value is not None and not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.batch_size is not None and (args.batch_size < 1 or not args.prompts):
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}" if args.prompts else
                         "--batch-size applies to --prompts FILE")
    if args.mode == "draft" and not args.draft_model:
        raise UsageError("--mode draft needs --draft-model DIR")
    check_mode_arguments(args.mode, as_flags=True, draft_cost=args.draft_cost, tree=args.tree,
                         prompt_lookup=args.prompt_lookup,
                         tree_budget=args.tree_budget, draft_model=args.draft_model)


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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from multitoken.decoding import generate

    _check_generate_flags(args)
    check_outputs(args.json)
    model, tokenizer = load_decoder(args)
    texts = _prompt_texts(args)
    prompts = [_encode(tokenizer, t, args.chat) for t in texts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise UsageError("empty prompt: it encodes to no tokens" if len(prompts) == 1 else
                             f"empty prompt: prompt {i + 1} of {args.prompts} encodes to no tokens")
    draft_model = None
    if args.mode == "draft":
        from multitoken.training import load_model
        draft_model, _ = load_model(args.draft_model)
    eos = None if args.no_eos else getattr(tokenizer, "eos_id", None)
    if eos is None and not args.no_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
    tree = tree_for(args, model) if args.mode == "tree" else None

    def run(batch: list[list[int]], max_new: int, on_tokens=None):
        return generate(model, [torch.tensor(ids) for ids in batch], max_new, mode=args.mode,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, draft_model=draft_model,
                        num_draft=args.num_draft, eos_id=eos, seed=args.seed, tree=tree,
                        tree_budget=args.tree_budget, on_tokens=on_tokens, truncate=args.truncate,
                        draft_cost=args.draft_cost, cost_model=args.cost_model, prompt_lookup=args.prompt_lookup)

    def plain(batch: list[list[int]]):
        return generate(model, [torch.tensor(ids) for ids in batch], args.max_new_tokens, eos_id=eos,
                        truncate=args.truncate)

    if args.compare:  # one-time costs (first-call allocations, oneDNN weight reorders) must not count
        run(prompts[:1], 2)
    if args.prompts:
        return _generate_batches(args, texts, prompts, tokenizer, run, plain)
    stream = _TextStream(tokenizer) if not args.quiet else None
    result = run(prompts, args.max_new_tokens, stream)
    if stream:
        stream.finish()
    report = {"mode": args.mode, **result.stats.to_dict()}
    if args.compare:
        report.update(_comparison(args, result, plain(prompts)))
    _print_stats(report)
    if args.json:
        write_json(args.json, report)
    return 0


def _comparison(args: argparse.Namespace, result, plain) -> dict:
    """--compare: identical to plain greedy (None when sampling), plain speed and the speed-up."""
    return {"identical": plain.tokens == result.tokens if args.temperature == 0 else None,
            "plain_tokens_per_s": plain.stats.tokens_per_s,
            "speedup": result.stats.tokens_per_s / max(plain.stats.tokens_per_s, 1e-9)}


def _generate_batches(args: argparse.Namespace, texts: list[str], prompts: list[list[int]], tokenizer, run,
                      plain) -> int:
    """--prompts: decode the prompts in batches of --batch-size (default: all in one), print each
    row's text and each batch's stats; --json gets per-batch stats and per-row results."""
    size = args.batch_size or len(prompts)
    starts = range(0, len(prompts), size)
    batches, rows = [], []
    for number, start in enumerate(starts, start=1):
        chunk = prompts[start: start + size]
        result = run(chunk, args.max_new_tokens)
        report = {"mode": args.mode, "batch": number, "prompts": len(chunk), **result.stats.to_dict()}
        reference = plain(chunk) if args.compare else None
        if reference is not None:
            report.update(_comparison(args, result, reference))
        for i, tokens in enumerate(result.tokens):
            row = {"index": start + i, "prompt": texts[start + i], "text": tokenizer.decode(tokens),
                   "tokens": tokens, "new_tokens": len(tokens)}
            if reference is not None:
                row["identical"] = tokens == reference.tokens[i] if args.temperature == 0 else None
            if not args.quiet:
                print(f"--- prompt {start + i + 1} ---\n{row['text']}", flush=True)
            rows.append(row)
        _print_stats(report, f"batch {number}/{len(starts)}, {len(chunk)} prompts")
        batches.append(report)
    if args.json:
        write_json(args.json, {"mode": args.mode, "batch_size": size, "batches": batches, "rows": rows})
    return 0


def _print_stats(r: dict, label: str | None = None) -> None:
    acc = " ".join(f"{a:.2f}" for a in r.get("acceptance_rates", []))
    mode = f"{r['mode']}, {label}" if label else r["mode"]
    line = (f"[{mode}] {r['new_tokens']} tokens in {r['wall_s']:.2f}s ({r['tokens_per_s']:.1f} tok/s), "
            f"{r['forward_passes']} forward passes, tau={r['tau']:.2f}")
    if acc:
        line += f", acceptance per head: {acc}"
    if "speedup" in r:
        ident = {True: "yes", False: "NO", None: "n/a (sampling)"}[r["identical"]]
        line += f"; vs plain: {r['speedup']:.2f}x, identical: {ident}"
    print(line, file=sys.stderr)


def add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text: plain, self-speculative, draft-model or tree decoding")
    g.add_argument("--model", help="trained multitoken checkpoint or run directory")
    g.add_argument("--base", help="Hugging Face base model: 'smollm2' or a folder/GGUF path (with --heads)")
    g.add_argument("--heads", help="directory of MTP heads trained for --base")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file (UTF-8; bad bytes replaced)")
    g.add_argument("--prompts", metavar="FILE", help="several prompts decoded as a batch: one per non-empty line, "
                   "or JSONL with a \"prompt\" or \"text\" field; prints each row's text")
    g.add_argument("--batch-size", type=int, help="with --prompts: decode N prompts at a time (default: all)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt (each prompt) in the model's chat template")
    add_decode_path_flags(g)
    g.add_argument("--mode", choices=MODES, default="tree",
                   help="decoding algorithm (default: tree, the heads' cost-aware tree with prompt lookup)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--num-draft", type=int, help="draft tokens per step (default: all heads; 4 for --mode draft)")
    add_draft_cost_flag(g, default=None)
    g.add_argument("--cost-model", choices=("auto", "off"), default="auto",
                   help="auto (default): draft length (spec) and tree size (tree) from this machine's measured pass "
                        "costs, calibrated once per model and cached; off: every step drafts all heads, the tree "
                        "is the saved or preset one")
    g.add_argument("--draft-model", help="checkpoint of the draft model for --mode draft")
    g.add_argument("--tree", help="tree for --mode tree: JSON list of paths, e.g. '[[0],[1],[0,0]]', or a preset name")
    g.add_argument("--tree-budget", type=int, help="build the tree dynamically each step with this many nodes")
    g.add_argument("--prompt-lookup", type=int, metavar="N",
                   help="--mode tree: also verify up to N tokens copied from where the text's last 2-3 tokens occurred "
                        f"before (prompt or output), in the same pass as the heads' tree; 0 = off (default: "
                        f"{DEFAULT_LOOKUP}, grafted where the cost model says it pays; off with --cost-model off)")
    g.add_argument("--seed", type=int, help="random seed for sampling")
    g.add_argument("--no-eos", action="store_true", help="do not stop at the tokenizer's end-of-text token")
    g.add_argument("--truncate", choices=["left"], help="drop the oldest prompt tokens that do not fit the context")
    g.add_argument("--compare", action="store_true", help="also run plain greedy decoding: identical? speed-up?")
    g.add_argument("--json", help="write the stats (tau, acceptance_rates, speedup, identical, ...) to this file")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--quiet", action="store_true", help="do not stream the text, print only the stats")
    g.set_defaults(func=cmd_generate)


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from multitoken.data import prompts as sets  # module attribute: tests replace validation_prompts
    from multitoken.decoding import build_tree, expected_accept_length, measure_topk_acceptance, save_tree
    from multitoken.decoding.tree_presets import tree_file

    for flag, value, least in (("--budget", args.budget, 1), ("--top-k", args.top_k, 1),
                               ("--prompts", args.prompts, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--max-new-tokens", args.max_new_tokens, 2)):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    folder = model_dir(args)
    if folder is None:
        raise UsageError("tune-tree saves the tree next to the heads: give --heads DIR with --base")
    check_outputs(tree_file(folder))
    model, tokenizer = load_decoder(args)
    prompts = sets.validation_prompts(tokenizer, args.prompts, args.prompt_tokens)
    # tune_tree returns only the paths; this command also prints and saves the acceptance table
    top_k = tuning_top_k(args.budget, args.top_k, model.vocab_size)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else library_default(tune_tree, "max_new_tokens")
    acc = measure_topk_acceptance(model, prompts, None, top_k, max_new)
    paths = build_tree(acc, args.budget)
    path = save_tree(paths, folder, acceptance=acc.tolist(), budget=args.budget)
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
    t.add_argument("--budget", type=int, required=True, help="tree nodes (candidates verified per step), >= 1")
    t.add_argument("--top-k", type=int, help="candidates measured per head (default: tune_tree's, min(budget, 10))")
    t.add_argument("--prompts", type=int, default=16, help="validation prompts (default 16)")
    t.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    t.add_argument("--max-new-tokens", type=int, help="greedy tokens decoded per prompt (default "
                   f"{library_default(tune_tree, 'max_new_tokens')})")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.set_defaults(func=cmd_tune_tree)
