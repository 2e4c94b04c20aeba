"""``multitoken generate`` (stream text, report τ and acceptance) and ``multitoken tune-tree``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from multitoken.cli.common import (UsageError, add_decode_path_flags, add_draft_cost_flag, check_outputs,
                                   library_default, load_decoder, model_dir, tree_for)
from multitoken.decoding import MODES, tune_tree
from multitoken.io import write_json


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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch
    from multitoken.decoding import generate

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0, got {args.temperature}")
    check_outputs(args.json)
    model, tokenizer = load_decoder(args)
    text = _prompt_text(args)
    if args.chat:
        from multitoken.hf import apply_chat_template_or_fail
        ids = tokenizer.encode(apply_chat_template_or_fail(getattr(tokenizer, "hf", tokenizer), text))
    else:
        ids = tokenizer.encode(text)
    if not ids:
        raise UsageError("empty prompt: it encodes to no tokens")
    draft_model = None
    if args.mode == "draft":
        if not args.draft_model:
            raise UsageError("--mode draft needs --draft-model DIR")
        from multitoken.training import load_model
        draft_model, _ = load_model(args.draft_model)
    eos = None if args.no_eos else getattr(tokenizer, "eos_id", None)
    if eos is None and not args.no_eos:
        eos = getattr(tokenizer, "eos_token_id", None)
    stream = _TextStream(tokenizer) if not args.quiet else None
    tree = tree_for(args, model) if args.mode == "tree" else None

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
        write_json(args.json, report)
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


def add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text: plain, self-speculative, draft-model or tree decoding")
    g.add_argument("--model", help="trained multitoken checkpoint or run directory")
    g.add_argument("--base", help="Hugging Face base model: 'smollm2' or a folder/GGUF path (with --heads)")
    g.add_argument("--heads", help="directory of MTP heads trained for --base")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-file", help="read the prompt from this file (UTF-8; bad bytes replaced)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_decode_path_flags(g)
    g.add_argument("--mode", choices=MODES, default="spec", help="decoding algorithm (default: spec)")
    g.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples losslessly")
    g.add_argument("--top-k", type=int, help="sample from the k most likely tokens")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    g.add_argument("--num-draft", type=int, help="draft tokens per step (default: all heads; 4 for --mode draft)")
    add_draft_cost_flag(g, default=None)
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


def cmd_tune_tree(args: argparse.Namespace) -> int:
    from multitoken.data import prompts as sets  # module attribute: tests replace validation_prompts
    from multitoken.decoding import build_tree, expected_accept_length, measure_topk_acceptance, save_tree

    model, tokenizer = load_decoder(args)
    prompts = sets.validation_prompts(tokenizer, args.prompts, args.prompt_tokens)
    # tune_tree's top_k rule: tune_tree returns only the paths, and this command also prints and saves the acceptance
    top_k = min(args.top_k or min(args.budget, 10), model.vocab_size)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else library_default(tune_tree, "max_new_tokens")
    acc = measure_topk_acceptance(model, prompts, None, top_k, max_new)
    paths = build_tree(acc, args.budget)
    path = save_tree(paths, model_dir(args), acceptance=acc.tolist(), budget=args.budget)
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
    t.add_argument("--top-k", type=int, help="candidates measured per head (default: tune_tree's, min(budget, 10))")
    t.add_argument("--prompts", type=int, default=16, help="validation prompts (default 16)")
    t.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (default 64)")
    t.add_argument("--max-new-tokens", type=int, help="greedy tokens decoded per prompt (default "
                   f"{library_default(tune_tree, 'max_new_tokens')})")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.set_defaults(func=cmd_tune_tree)
