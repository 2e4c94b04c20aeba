"""A run's metrics log: ``metrics.jsonl`` rows (and TensorBoard scalars when installed).

One JSON object per line, written by rank 0 alone: training rows every ``log_every`` steps,
``"split": "val"`` rows at each evaluation. Head training writes the same format.
"""
from __future__ import annotations

import json
from pathlib import Path

from multitoken.io import atomic_write

METRICS = "metrics.jsonl"
TB_SCALARS = ("loss", "primary", "auxiliary", "lr", "tokens_per_s", "perplexity", "grad_norm")


NO_TARGETS = "no targets"  # how a head with nothing to predict is shown (None in JSON rows)


def per_head(values: list[float], counts: list[float]) -> list[float | None]:
    """Per-head values with None where the head had no valid target (its 0 means nothing)."""
    return [v if c > 0 else None for v, c in zip(values, counts)]


def percent(v: float | None) -> str:
    """An accuracy as ``12.3%``, or "no targets"."""
    return NO_TARGETS if v is None else f"{v:.1%}"


def format_head_table(ev: dict) -> str:
    """A small text table of per-head validation loss / top-1 accuracy ("no targets" for a head
    that had none)."""
    lines = ["head  predicts  val loss  val acc", "----  --------  --------  -------"]
    for i, (loss, acc) in enumerate(zip(ev["head_losses"], ev["head_accuracy"])):
        values = f"{NO_TARGETS:>8}" if loss is None else f"{loss:8.4f}  {percent(acc):>7}"
        lines.append(f"{i:>4}  {'t+' + str(i + 1):>8}  {values}")
    ppl = NO_TARGETS if ev.get("perplexity") is None else f"{ev['perplexity']:.3f}"
    lines.append(f"next-token perplexity {ppl} (step {ev['step']}, {ev['tokens']} tokens)")
    return "\n".join(lines)


class MetricsLog:
    """Appends rows to ``path`` (None: rows go nowhere) and, once opened, to TensorBoard."""

    def __init__(self, path: Path | None):
        self.path = path
        self._tb = None

    def write(self, row: dict) -> None:
        """Append one row (a JSON line; a killed run loses at most the line being written)."""
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = "val" if row.get("split") == "val" else "train"
            scalars = {k: row.get(k) for k in TB_SCALARS}
            for i, (l, a) in enumerate(zip(row["head_losses"], row["head_accuracy"])):
                scalars.update({f"head{i}_loss": l, f"head{i}_accuracy": a})
            for k, v in scalars.items():
                if v is not None:  # None: no targets, nothing to plot
                    self._tb.add_scalar(f"{prefix}/{k}", v, row["step"])

    def truncate(self, step: int) -> None:
        """Drop rows written after ``step`` (a killed run's tail, past the checkpoint we resume)."""
        p = self.path
        if p is None or not p.exists():
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        atomic_write(p, "".join(l + "\n" for l in keep))

    def open_tensorboard(self, log_dir: Path, step: int) -> None:
        """Also log to TensorBoard under ``log_dir`` when the optional package is installed."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: `pip install tensorboard`
            return
        self._tb = SummaryWriter(str(log_dir), purge_step=step + 1)

    def close(self) -> None:
        """Release the TensorBoard writer (the JSONL file is never held open)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None
