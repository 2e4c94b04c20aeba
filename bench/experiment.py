"""MTP vs next-token on the stdlib corpus: the same trunk, the same tokens, different heads.

Trains the `small` preset three times (n_future=1; n_future=4 `residual`; n_future=4
`sequential`), evaluates next-token validation loss/perplexity and per-head accuracy, runs
the decoding benchmark on each model, renders plots, and writes docs/results.md.
Resumable: finished runs are reused, interrupted ones resume from their last checkpoint.

    make experiment            # or: .venv/bin/python bench/experiment.py [--steps N]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from multitoken.data import validation_prompts
from multitoken.decoding import resolve_tree
from multitoken.io import atomic_write, write_json
from multitoken.measure.decode import bench_decode
from multitoken.measure.decode_tables import decode_markdown
from multitoken.measure.machine import describe_machine, machine_info, timestamp
from multitoken.measure.report import render_report
from multitoken.training import load_model, read_eval, train_demo_model

VARIANTS = {
    "next-token (n_future=1)": {"model": {"n_future": 1}},
    "MTP residual (n_future=4)": {"model": {"n_future": 4, "head_type": "residual"}},
    "MTP sequential (n_future=4)": {"model": {"n_future": 4, "head_type": "sequential"}},
}


def slug(name: str) -> str:
    return name.split(" (")[0].lower().replace(" ", "-").replace("/", "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/experiment", help="run directory")
    ap.add_argument("--steps", type=int, help="training steps per variant (default: the small preset's)")
    ap.add_argument("--prompts", type=int, default=12, help="decoding bench prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per bench prompt")
    ap.add_argument("--docs", default="docs", help="where results.md and its images go")
    args = ap.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    (docs / "img").mkdir(parents=True, exist_ok=True)
    results = []
    for name, overrides in VARIANTS.items():
        run = out / slug(name)
        start = time.time()
        ckpt = train_demo_model(run, steps=args.steps, overrides=overrides)
        train_s = time.time() - start
        torch.set_num_threads(1)
        model, tok = load_model(ckpt)
        prompts = validation_prompts(tok, args.prompts, 64)
        max_new = min(args.max_new_tokens, model.max_seq_len - 64)
        modes = ["ar"] + (["spec", "tree"] if model.n_future > 1 else [])
        tree = resolve_tree(None, ckpt, model.n_future - 1) if model.n_future > 1 else None
        result = bench_decode(model, prompts, modes, max_new, tree=tree)
        result.update(benchmark="decode", machine=machine_info(), date=timestamp())
        write_json(run / "model" / "bench_decode.json", result)
        render_report(run / "model", docs / "img" / slug(name))
        results.append(dict(name=name, slug=slug(name), eval=read_eval(ckpt), result=result,
                            params=model.num_parameters(), train_s=train_s))
    write_results(results, docs / "results.md", args)


def write_results(results: list[dict], path: Path, args) -> None:
    lines = ["# MTP vs next-token prediction on the Python stdlib (byte-level, CPU)", "",
             f"Machine: {describe_machine()}; date {time.strftime('%Y-%m-%d')}.", "",
             "Reproduce: `make experiment` (= `.venv/bin/python bench/experiment.py`"
             + (f" --steps {args.steps}" if args.steps else "") + "). Each variant trains the `small` preset "
             "(same trunk, same data order, same number of tokens) and differs only in its heads.", "",
             "## Training: next-token validation quality at equal tokens", "",
             "| variant | trunk params | head params | tokens | val next-token loss | perplexity | "
             "val acc t+1 / t+2 / t+3 / t+4 |", "|---|---|---|---|---|---|---|"]
    for r in results:
        ev = r["eval"] or {}
        accs = " / ".join(f"{a:.1%}" for a in ev.get("head_accuracy", []))
        lines.append(f"| {r['name']} | {r['params']['trunk']:,} | {r['params']['heads']:,} | {ev.get('tokens', 0):,} | "
                     f"{ev.get('primary', float('nan')):.4f} | {ev.get('perplexity', float('nan')):.3f} | {accs} |")
    lines += ["", "## Decoding: greedy, same model, same prompts, one process per model", ""]
    for r in results:
        lines.append(decode_markdown(r["result"], r["name"]))
    lines += ["", "## Curves", ""]
    for r in results:
        for png in sorted((path.parent / "img" / r["slug"]).glob("*.png")):
            lines.append(f"![{r['name']}: {png.stem}](img/{r['slug']}/{png.name})")
    # Hand-written findings above the marker survive a rerun; everything below is regenerated.
    marker = "<!-- generated: bench/experiment.py -->"
    head = path.read_text().split(marker)[0] if path.exists() and marker in path.read_text() else ""
    atomic_write(path, head + marker + "\n\n" + "\n".join(lines) + "\n")
    print(path.read_text())


if __name__ == "__main__":
    main()
