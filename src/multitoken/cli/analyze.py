"""``multitoken analyze`` (exact counts of a config) and ``multitoken report`` (plots + markdown of a run)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from multitoken.cli.common import UsageError


def cmd_analyze(args: argparse.Namespace) -> int:
    from multitoken.measure.analysis import analyze, format_analysis
    from multitoken.model.config import MTPConfig

    if bool(args.config) == bool(args.model):
        raise UsageError("give exactly one of --config FILE or --model DIR")
    cfg = MTPConfig.load(Path(args.config)) if args.config else _model_config(Path(args.model))
    result = analyze(cfg, seq_len=args.seq_len, batch_size=args.batch_size, chunk_size=args.chunk_size,
                     bench=args.bench)
    print(json.dumps(result, indent=2) if args.json else format_analysis(result).rstrip("\n"))
    return 0


def _model_config(path: Path):
    """The MTPConfig of --model: whatever ``generate --model`` accepts (a run or checkpoint
    folder), or a folder holding only config.json."""
    from multitoken.training.checkpoint import MODEL_CONFIG, find_checkpoint, load_model_config, resolve_checkpoint

    ckpt = find_checkpoint(path)
    if ckpt is None and not (path / MODEL_CONFIG).is_file():
        ckpt = resolve_checkpoint(path)  # raises its one-line error
    return load_model_config(ckpt or path)


def add_analyze(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="exact parameter, FLOP, memory and supervision counts of a config",
                       description="Parameters of trunk vs heads, training FLOPs per token with and without heads, "
                                   "activation/logit memory per step (naive vs memory-efficient), supervision signals "
                                   "per sequence, and with --bench the decoding speed-up bound tau*t(1)/t(verify).")
    p.add_argument("--config", help="MTPConfig JSON file")
    p.add_argument("--model", help="trained model: a run or checkpoint folder (as for generate), or a folder "
                                   "holding config.json")
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
