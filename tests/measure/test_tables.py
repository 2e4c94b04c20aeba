import json

import pytest

from multitoken.errors import MultitokenError
from multitoken.measure.machine import describe_machine, machine_info
from multitoken.measure.tables import load_result, update_readme, write_markdown


def test_write_markdown_has_machine_date_and_numbers(tmp_path):
    rows = [{"n_future": 1, "method": "naive", "peak_mb": 123.4, "peak_vs_n1": 1.0, "step_s": 0.5,
             "time_vs_naive": 1.0, "cpu_s": 0.9, "cpu_vs_naive": 1.0, "max_grad_diff": None},
            {"n_future": 4, "method": "mtp", "peak_mb": 130.0, "peak_vs_n1": 1.05, "step_s": 0.7,
             "time_vs_naive": 0.9, "cpu_s": 1.2, "cpu_vs_naive": 0.95, "max_grad_diff": 3e-9}]
    text = write_markdown("memory", rows, tmp_path / "m.md")
    assert (tmp_path / "m.md").read_text() == text
    assert describe_machine(machine_info()) in text and "Date:" in text
    assert "| 4 | mtp | 130.0 | 1.050 |" in text and "3.0e-09" in text
    generic = write_markdown("custom", [{"a": 1, "b": "x", "skip": [1, 2]}])
    assert "| a | b |" in generic and "| 1 | x |" in generic


def test_update_readme_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# Benchmarks\n\nHand-written intro.\n")
    update_readme(readme, "memory", "## memory\n\nold table\n", "multitoken bench memory")
    update_readme(readme, "train", "## train\n\ntrain table\n")
    update_readme(readme, "memory", "## memory\n\nnew table\n", "multitoken bench memory")
    text = readme.read_text()
    assert "Hand-written intro." in text and "new table" in text and "old table" not in text
    assert "train table" in text and text.count("<!-- bench:memory:start -->") == 1
    assert "Reproduce: `multitoken bench memory`" in text


def test_load_result_wraps_lists_and_rejects_garbage(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"a": 1}]))
    assert load_result(tmp_path / "rows.json")["rows"] == [{"a": 1}]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_result(tmp_path / "bad.json")
    with pytest.raises(MultitokenError, match="not found"):
        load_result(tmp_path / "missing.json")
