"""``multitoken report RUN_DIR``: plots and a markdown summary of a run and its benchmarks.

Inputs found in the run directory:

* ``metrics.jsonl``: one JSON object per logged step (``step``, ``tokens``, ``lr``, ``loss``,
  ``primary``, ``auxiliary``, ``head_losses`` [n], ``head_accuracy`` [n], ``tokens_per_s``);
  evaluation rows carry ``"split": "val"``. A truncated last line (a run killed mid-write)
  is skipped and counted.
* bench results (``*.json`` in the run dir or its ``bench/`` folder, or passed explicitly):
  ``memory`` / ``train`` results of :mod:`multitoken.measure.memory` / :mod:`~multitoken.measure.train_step` and decoding results whose rows
  have ``mode``, ``tau``, ``acceptance_rates`` [k], ``tokens_per_s``, ``speedup``. A file
  is recognised by its ``benchmark`` field or else by its rows' keys.

Outputs (PNG, matplotlib's Agg backend, and ``report.md``): training curves per head,
acceptance rate per draft position and τ / speed-up per decoding mode, peak memory vs
n_future, training-step cost per head type. matplotlib is the optional ``plot`` extra.
"""
from __future__ import annotations

import io
import json
import math
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import atomic_write, check_writable, read_json
from multitoken.measure.tables import write_markdown

BENCH_KINDS = ("memory", "train", "decode")


# ---------------------------------------------------------------------------- inputs
def load_metrics(path: str | Path) -> tuple[list[dict], list[dict], int]:
    """metrics.jsonl -> (train rows, val rows, number of unreadable lines skipped)."""
    train, val, bad = [], [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if not isinstance(row, dict):
                bad += 1
                continue
            (val if row.get("split") == "val" else train).append(row)
    return train, val, bad


def bench_kind(result: dict) -> str | None:
    """'memory', 'train', 'decode' or None (not a bench result)."""
    name = result.get("benchmark")
    if name in BENCH_KINDS:
        return name
    rows = result.get("rows")
    if not isinstance(rows, list) or not rows or not isinstance(rows[0], dict):
        return None
    keys = set(rows[0])
    if "tau" in keys or "acceptance_rates" in keys:
        return "decode"
    if {"method", "peak_mb", "n_future"} <= keys:
        return "memory"
    if {"head_type", "n_future", "step_s"} <= keys:
        return "train"
    return None


def find_bench_results(run_dir: str | Path, extra: list[str | Path] = ()) -> dict[str, dict]:
    """{kind: result} from the run dir's JSON files (and ``extra`` files, which win)."""
    run_dir = Path(run_dir)
    explicit = [Path(p) for p in extra]
    candidates = sorted(run_dir.glob("*.json")) + sorted((run_dir / "bench").glob("*.json")) + explicit
    found: dict[str, dict] = {}
    for path in candidates:
        try:
            data = read_json(path, "bench file")
        except MultitokenError:
            if path in explicit:  # a file the user named must be readable; others may be anything
                raise
            continue
        if isinstance(data, list):
            data = {"rows": data}
        kind = bench_kind(data) if isinstance(data, dict) else None
        if kind:
            data["_path"] = str(path)
            found[kind] = data
        elif path in explicit:
            raise MultitokenError(f"{path} is not a memory, train or decode bench result")
    return found


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise MultitokenError("plotting needs matplotlib: pip install matplotlib (or pip install 'multitoken[plot]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write(path, buf.getvalue())
    plt.close(fig)


# ---------------------------------------------------------------------------- plots
def _x(rows: list[dict]) -> tuple[list, str]:
    if rows and all("tokens" in r for r in rows):
        return [r["tokens"] for r in rows], "tokens"
    return [r.get("step", i) for i, r in enumerate(rows)], "step"


def plot_training(train: list[dict], val: list[dict], path: Path) -> None:
    """Loss and top-1 accuracy per head vs tokens (train lines, validation markers)."""
    plt = _pyplot()
    n = max((len(r.get("head_losses") or []) for r in train + val), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "head_losses", "cross-entropy"), (axes[1], "head_accuracy", "top-1 accuracy")):
        for i in range(n):
            color = f"C{i % 10}"
            for rows, style in ((train, "-"), (val, "o--")):
                pts = [(x, r[key][i]) for x, r in zip(_x(rows)[0], rows) if len(r.get(key) or []) > i]
                if pts:
                    xs, ys = zip(*pts)
                    name = f"head {i} (t+{i + 1})" + (" val" if rows is val else "")
                    ax.plot(xs, ys, style, color=color, label=name, alpha=0.9 if rows is val else 0.7,
                            markersize=4)
        if n == 0 and key == "head_losses":  # no per-head data: plot the total loss
            for rows, style in ((train, "-"), (val, "o--")):
                pts = [(x, r["loss"]) for x, r in zip(_x(rows)[0], rows) if "loss" in r]
                if pts:
                    ax.plot(*zip(*pts), style, label="loss" + (" val" if rows is val else ""))
        ax.set_xlabel(_x(train or val)[1])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    axes[0].set_title("loss per head")
    axes[1].set_title("accuracy per head")
    _save(plt, fig, path)


def plot_acceptance(rows: list[dict], path: Path) -> None:
    """Acceptance rate of draft position i (given drafts < i accepted), one line per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        rates = r.get("acceptance_rates") or []
        if rates:
            ax.plot(range(1, len(rates) + 1), rates, "o-", label=str(r.get("mode", "?")))
    ax.set_xlabel("draft position")
    ax.set_ylabel("acceptance rate")
    ax.set_ylim(0, 1.05)
    ax.set_title("acceptance rate per draft position")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(plt, fig, path)


def plot_decoding(rows: list[dict], path: Path) -> None:
    """τ and speed-up per decoding mode (bars)."""
    plt = _pyplot()
    modes = [str(r.get("mode", i)) for i, r in enumerate(rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "tau", "τ (tokens per verification pass)"), (axes[1], "speedup", "speed-up vs plain decoding")):
        values = [float(r[key]) if r.get(key) is not None else math.nan for r in rows]
        bars = ax.bar(range(len(rows)), values, color=[f"C{i % 10}" for i in range(len(rows))])
        ax.bar_label(bars, labels=["-" if math.isnan(v) else f"{v:.2f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(rows)), modes, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if key == "speedup":
            ax.axhline(1.0, color="k", lw=0.8)
    _save(plt, fig, path)


def plot_memory(rows: list[dict], path: Path) -> None:
    """Peak memory and step time vs n_future, one line per backward method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        pts = sorted((r["n_future"], r.get("peak_mb"), r.get("step_s")) for r in rows if r["method"] == method)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] if p[1] is not None else math.nan for p in pts], "o-", color=f"C{i}", label=method)
        axes[1].plot(xs, [p[2] if p[2] is not None else math.nan for p in pts], "o-", color=f"C{i}", label=method)
    for ax, label in ((axes[0], "peak memory of one step (MB)"), (axes[1], "step time (s)")):
        ax.set_xlabel("n_future")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["n_future"] for r in rows}), [str(n) for n in sorted({r["n_future"] for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("memory vs n_future")
    axes[1].set_title("time vs n_future")
    _save(plt, fig, path)


def plot_train_bench(rows: list[dict], path: Path) -> None:
    """Training-step time relative to next-token training, per head type and n_future."""
    plt = _pyplot()
    labels = [f"next-token ({r.get('backward', '?')})" if r.get("n_future") == 1 else f"{r['head_type']} n={r['n_future']}"
              for r in rows]
    values = [r.get("time_vs_ntp") or math.nan for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows)), 4))
    bars = ax.bar(range(len(rows)), values, color=[f"C{r['n_future'] % 10}" for r in rows])
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7)
    ax.set_xticks(range(len(rows)), labels, rotation=40, ha="right", fontsize=8)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_ylabel("step time / next-token step time")
    ax.set_title("training-step cost of MTP")
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)


# ---------------------------------------------------------------------------- markdown
def _f(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _training_summary(train: list[dict], val: list[dict], bad: int) -> list[str]:
    lines = ["## Training", ""]
    if not train and not val:
        return lines + ["No metrics rows.", ""]
    last = train[-1] if train else {}
    lines.append(f"{len(train)} logged training steps, {len(val)} evaluations"
                 + (f", {bad} unreadable line(s) skipped" if bad else "") + ".")
    if last:
        lines.append(f"Last training row: step {last.get('step', '-')}, tokens {last.get('tokens', '-')}, "
                     f"loss {_f(last.get('loss'))}, primary {_f(last.get('primary'))}, "
                     f"tokens/s {_f(last.get('tokens_per_s'), 1)}.")
    lines.append("")
    for name, rows in (("training", train), ("validation", val)):
        if not rows:
            continue
        r = rows[-1]
        losses, accs = r.get("head_losses") or [], r.get("head_accuracy") or []
        if not losses:
            continue
        lines += [f"Per head, last {name} row (step {r.get('step', '-')}):", "",
                  "| head | predicts | loss | perplexity | top-1 accuracy |", "|---|---|---|---|---|"]
        for i, loss in enumerate(losses):
            ppl = math.exp(loss) if loss is not None and loss < 50 else None
            acc = accs[i] if i < len(accs) else None
            lines.append(f"| {i} | t+{i + 1} | {_f(loss)} | {_f(ppl, 2)} | {_f(acc)} |")
        lines.append("")
    if val and val[-1].get("primary") is not None:
        p = val[-1]["primary"]
        lines += [f"Next-token validation loss {p:.4f} (perplexity {math.exp(p):.2f}).", ""]
    return lines


def _decode_table(rows: list[dict]) -> list[str]:
    width = max((len(r.get("acceptance_rates") or []) for r in rows), default=0)
    head = "| mode | τ | tokens/s | speed-up |" + "".join(f" acc@{i + 1} |" for i in range(width))
    lines = [head, "|" + "---|" * (4 + width)]
    for r in rows:
        rates = list(r.get("acceptance_rates") or []) + [None] * width
        lines.append(f"| {r.get('mode', '-')} | {_f(r.get('tau'), 2)} | {_f(r.get('tokens_per_s'), 1)} | "
                     f"{_f(r.get('speedup'), 2)} |" + "".join(f" {_f(a, 2)} |" for a in rates[:width]))
    return lines


def _recorded(result: dict) -> dict:
    """Never describe this machine as the one a stored result was measured on."""
    return {"machine": result.get("machine") or {"description": "machine not recorded"},
            "date": result.get("date") or "not recorded"}


def render_report(run_dir: str | Path, out_dir: str | Path | None = None,
                  bench_files: list[str | Path] = ()) -> dict:
    """Write the plots and ``report.md`` for a run directory; return {"report": path, "plots": [...]}."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    metrics = run_dir / "metrics.jsonl"
    train, val, bad = load_metrics(metrics) if metrics.exists() else ([], [], 0)
    benches = find_bench_results(run_dir, bench_files)
    if not train and not val and not benches:
        raise MultitokenError(f"nothing to report in {run_dir}: no metrics.jsonl rows and no bench JSON files")
    _pyplot()  # fail early, before anything is written, when matplotlib is missing
    out = Path(out_dir) if out_dir else run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "report.md", "report")
    plots: list[Path] = []
    lines = [f"# Report: {run_dir.name}", ""]

    def add_plot(fn, data, name: str, caption: str) -> None:
        path = out / name
        fn(*data, path)
        plots.append(path)
        lines.extend([f"![{caption}]({name})", ""])

    if train or val:
        lines += _training_summary(train, val, bad)
        add_plot(plot_training, (train, val), "training_curves.png", "training curves per head")
    if "decode" in benches:  # grouped results (prompt groups): the pooled "all" rows
        rows = [r for r in benches["decode"]["rows"] if r.get("group", "all") == "all"]
        lines += ["## Decoding", "", f"From `{benches['decode']['_path']}`.", ""] + _decode_table(rows) + [""]
        if any(r.get("acceptance_rates") for r in rows):
            add_plot(plot_acceptance, (rows,), "acceptance.png", "acceptance rate per draft position")
        add_plot(plot_decoding, (rows,), "decoding.png", "tau and speed-up per decoding mode")
    if "memory" in benches:
        result = benches["memory"]
        lines += [write_markdown("memory", result, meta=_recorded(result)), f"From `{result['_path']}`.", ""]
        add_plot(plot_memory, (result["rows"],), "memory.png", "peak memory vs n_future")
    if "train" in benches:
        result = benches["train"]
        lines += [write_markdown("train", result, meta=_recorded(result)), f"From `{result['_path']}`.", ""]
        add_plot(plot_train_bench, (result["rows"],), "train_bench.png", "training-step cost per head type")
    report = out / "report.md"
    atomic_write(report, "\n".join(lines).rstrip() + "\n")
    return {"report": str(report), "plots": [str(p) for p in plots]}
