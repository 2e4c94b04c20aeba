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


def format_head_table(ev: dict) -> str:
    """A small text table of per-head validation loss / top-1 accuracy."""
    lines = ["head  predicts  val loss  val acc", "----  --------  --------  -------"]
    for i, (loss, acc) in enumerate(zip(ev["head_losses"], ev["head_accuracy"])):
        lines.append(f"{i:>4}  {'t+' + str(i + 1):>8}  {loss:8.4f}  {acc:7.1%}")
    lines.append(f"next-token perplexity {ev['perplexity']:.3f} (step {ev['step']}, {ev['tokens']} tokens)")
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
            for k in TB_SCALARS:
                if k in row:
                    self._tb.add_scalar(f"{prefix}/{k}", row[k], row["step"])
            for i, (l, a) in enumerate(zip(row["head_losses"], row["head_accuracy"])):
                self._tb.add_scalar(f"{prefix}/head{i}_loss", l, row["step"])
                self._tb.add_scalar(f"{prefix}/head{i}_accuracy", a, row["step"])

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
