"""The metrics log and the per-head table: a head with no target is "no targets", never 0."""
import json

from multitoken.training.metrics import MetricsLog, format_head_table


def test_head_table_says_no_targets():
    ev = {"head_losses": [1.5, None], "head_accuracy": [0.25, None], "perplexity": 4.48, "step": 3, "tokens": 9}
    lines = format_head_table(ev).splitlines()
    assert "1.5000" in lines[2] and "25.0%" in lines[2]
    assert "no targets" in lines[3] and "0.0" not in lines[3]
    ev = {**ev, "head_losses": [None, None], "head_accuracy": [None, None], "perplexity": None}
    text = format_head_table(ev)
    assert "perplexity" in text and "no targets" in text.splitlines()[-1] and "1.000" not in text


def test_metrics_rows_keep_none(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write({"step": 1, "loss": 1.0, "head_losses": [1.0, None], "head_accuracy": [0.5, None]})
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["head_losses"] == [1.0, None] and row["head_accuracy"] == [0.5, None]
