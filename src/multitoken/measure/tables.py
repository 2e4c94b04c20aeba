"""Benchmark result tables: markdown for one result, bench JSON files, and the sections of
``bench/README.md`` that ``--readme`` and ``bench readme`` refresh."""
from __future__ import annotations

from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import atomic_write, read_json
from multitoken.measure.machine import describe_machine, machine_info, timestamp

def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


# Per benchmark: (title, [(column header, row key)], explanation). Unknown benchmarks get
# every scalar key of their rows as columns.
TABLES: dict[str, tuple[str, list[tuple[str, str]], str]] = {
    "memory": ("Training-step memory: naive vs memory-efficient MTP backward", [
        ("n_future", "n_future"), ("method", "method"), ("peak MB", "peak_mb"), ("peak / n=1", "peak_vs_n1"),
        ("step s", "step_s"), ("time / naive", "time_vs_naive"), ("CPU s", "cpu_s"), ("CPU / naive", "cpu_vs_naive"),
        ("max abs grad diff", "max_grad_diff")],
        "One training step (forward + backward, no optimizer) on random tokens. `naive`: all heads' logits "
        "(B, T, n, V) materialised, one backward. `mtp`: `mtp_backward` (trunk once, heads' logits + CE + backward "
        "one head at a time). `mtp_chunked`: same with CE over chunks of positions. `peak / n=1`: peak over the same "
        "method's n_future=1 peak. `time / naive`: step time over the naive step's at the same n_future. "
        "`max abs grad diff`: largest |gradient - naive gradient| over all parameters. `step s`: median wall-clock "
        "seconds; `CPU s`: median process CPU seconds of the same steps (less disturbed by other load)."),
    "train": ("Training throughput: next-token vs MTP", [
        ("head type", "head_type"), ("n_future", "n_future"), ("backward", "backward"), ("step s", "step_s"),
        ("tokens/s", "tokens_per_s"), ("time / next-token", "time_vs_ntp"), ("CPU s", "cpu_s"),
        ("CPU / next-token", "cpu_vs_ntp"), ("FLOPs / next-token", "flops_vs_ntp"), ("peak MB", "peak_mb"),
        ("params", "params"), ("head params", "head_params")],
        "Full training steps (zero_grad, forward + backward, AdamW step) on random tokens. `time / next-token`: step "
        "time over the first row's (next-token training with the plain backward). Peak memory excludes parameters "
        "and AdamW state (allocated before the baseline) and includes gradients. `FLOPs / next-token`: the analytic "
        "training FLOPs per token (`multitoken analyze`) over next-token training's, for comparison. `step s`: median wall-clock seconds; "
        "`CPU s`: median process CPU seconds of the same steps (less disturbed by other load)."),
}


def _table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)) for _, k in columns) + " |")
    return "\n".join(lines)


def write_markdown(name: str, rows: list[dict] | dict, path: str | Path | None = None,
                   meta: dict | None = None, heading_level: int = 2) -> str:
    """Render one benchmark's markdown table (title, machine, date, settings, method, table).

    ``rows`` is a result dict from a ``bench_*`` function (its machine/date/settings are
    used) or a plain list of rows (then ``meta`` may carry ``machine``/``date``/``settings``;
    the current machine and date are filled in). Writes ``path`` if given; returns the text.
    """
    if isinstance(rows, dict):
        meta, rows = {**rows, **(meta or {})}, rows.get("rows", [])
    meta = dict(meta or {})
    machine = meta.get("machine") or machine_info(meta.get("settings", {}).get("device", "cpu"))
    date = meta.get("date") or timestamp()
    title, columns, explanation = TABLES.get(name, (f"{name} benchmark", None, ""))
    if columns is None:
        keys = [k for k in (rows[0] if rows else {}) if not isinstance(rows[0][k], (list, dict))]
        columns = [(k, k) for k in keys]
    settings = meta.get("settings", {})
    peak_note = settings.get("peak_memory")
    shown = ", ".join(f"{k}={v}" for k, v in settings.items() if k != "peak_memory")
    hashes = "#" * heading_level
    parts = [f"{hashes} {title}", "",
             f"Machine: {describe_machine(machine)}. Date: {date}.", ""]
    if shown:
        parts += [f"Settings: {shown}.", ""]
    if explanation:
        parts += [explanation, ""]
    if peak_note:
        parts += [f"Peak memory: {peak_note}.", ""]
    parts.append(_table(rows, columns))
    text = "\n".join(parts) + "\n"
    if path:
        atomic_write(path, text)
    return text


def load_result(path: str | Path) -> dict:
    """A bench JSON file as a result dict (a bare list of rows is wrapped)."""
    data = read_json(path, "bench file")
    if isinstance(data, list):
        data = {"rows": data}
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise MultitokenError(f"bench file {path} has no list of rows")
    data.setdefault("benchmark", Path(path).stem)
    return data


README_HEADER = """# Benchmarks

Each section is written by the command quoted under its table (`--readme bench/README.md`) or rebuilt
from the JSON files by `multitoken bench readme`; the JSON files hold every row, the machine and the date.
This machine is shared: wall-clock times move with other processes (see each table's load average); the
`CPU s` columns (process CPU time of the same steps) are less affected, and ratios taken within one table
compare settings that ran interleaved, step by step, in one process.
"""


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"


def update_readme(path: str | Path, name: str, markdown: str, command: str | None = None) -> str:
    """Replace (or append) the ``name`` section of a README between its markers.

    The section holds ``markdown`` (from :func:`write_markdown`) and the command that
    reproduces it. Other sections and hand-written text are left alone. Returns the README.
    """
    path = Path(path)
    start, end = _markers(name)
    body = markdown.rstrip() + "\n"
    if command:
        body += f"\nReproduce: `{command}`\n"
    section = f"{start}\n{body}{end}"
    text = path.read_text() if path.exists() else README_HEADER
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write(path, text)
    return text


