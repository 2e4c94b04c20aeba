import json

import pytest
import torch

from multitoken.measure.bench import (PeakMemory, bench_memory, bench_train, describe_machine, load_result, machine_info,
                              update_readme, write_markdown)
from multitoken.cli.main import main

TINY = dict(vocab_size=96, d_model=32, n_layer=1, seq_len=16, batch_size=2, repeats=1)


def test_peak_memory_sees_a_large_allocation():
    tracker = PeakMemory("cpu")
    if tracker.method == "unavailable":
        pytest.skip("no /proc/self/status on this system")
    tracker.reset()
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
    del x
    assert tracker.peak_bytes() >= 60 * 2 ** 20


def test_bench_memory_rows_ratios_and_gradient_check():
    result = bench_memory(n_futures=[1, 2], isolate=False, **TINY)
    rows = result["rows"]
    assert [(r["n_future"], r["method"]) for r in rows] == [
        (1, "naive"), (1, "mtp"), (1, "mtp_chunked"), (2, "naive"), (2, "mtp"), (2, "mtp_chunked")]
    for r in rows:
        assert r["step_s"] > 0 and r["cpu_s"] >= 0 and r["peak_mb"] is not None
        assert r["time_vs_naive"] is not None
        if r["method"] == "naive":
            assert r["max_grad_diff"] is None and r["time_vs_naive"] == 1.0
        else:
            assert r["max_grad_diff"] < 1e-5  # the memory-efficient gradients equal the naive ones
    assert all(r["peak_vs_n1"] in (None, 1.0) for r in rows if r["n_future"] == 1)
    assert result["benchmark"] == "memory" and result["settings"]["vocab_size"] == 96
    assert {"cpu", "cores", "torch", "threads"} <= set(result["machine"])


def test_bench_memory_isolated_worker_process():
    result = bench_memory(n_futures=[2], methods=("naive", "mtp"), isolate=True, threads=1, **TINY)
    assert [r["method"] for r in result["rows"]] == ["naive", "mtp"]
    assert result["rows"][1]["max_grad_diff"] < 1e-5
    assert "fresh worker process" in result["settings"]["peak_memory"]


def test_bench_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        bench_memory(methods=("bogus",), isolate=False, **TINY)
    with pytest.raises(ValueError, match="n_future"):
        bench_memory(n_futures=[0], isolate=False, **TINY)


def test_bench_train_rows():
    result = bench_train(head_types=["residual", "sequential"], n_futures=[2], isolate=False,
                         vocab_size=64, d_model=32, n_layer=2, seq_len=16, batch_size=2, repeats=1)
    rows = result["rows"]
    assert [(r["head_type"], r["n_future"], r["backward"]) for r in rows] == [
        ("-", 1, "naive"), ("-", 1, "mtp"), ("residual", 2, "mtp"), ("sequential", 2, "mtp")]
    assert rows[0]["time_vs_ntp"] == 1.0 and rows[0]["head_params"] == 0
    assert rows[2]["head_params"] == 2 * 32 * 32  # one residual MLP
    assert rows[0]["flops_vs_ntp"] == 1.0 and rows[3]["flops_vs_ntp"] > rows[2]["flops_vs_ntp"] > 1
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"], rel=0.01)
    with pytest.raises(ValueError, match="head type"):
        bench_train(head_types=["nope"], isolate=False)


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


def test_cli_bench_memory_and_readme(tmp_path, capsys):
    out = tmp_path / "bench"
    argv = ["bench", "memory", "--vocab-size", "64", "--d-model", "32", "--n-layer", "1", "--seq-len", "8",
            "--batch-size", "1", "--n-future", "1", "2", "--repeats", "1", "--in-process", "--quiet",
            "--json", str(out / "memory.json"), "--markdown", str(out / "memory.md"), "--readme", str(out / "README.md")]
    assert main(argv) == 0
    result = load_result(out / "memory.json")
    assert len(result["rows"]) == 6 and "machine" in result
    assert "Training-step memory" in (out / "memory.md").read_text()
    assert "<!-- bench:memory:start -->" in (out / "README.md").read_text()
    (out / "README.md").unlink()
    assert main(["bench", "readme", "--dir", str(out)]) == 0
    text = (out / "README.md").read_text()
    assert "Reproduce: `multitoken bench memory --vocab-size 64" in text and "| 2 | mtp |" in text


def test_cli_bench_bad_input_is_one_line(capsys):
    assert main(["bench", "memory", "--n-future", "0", "--in-process", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "n_future" in err[0]


def test_load_result_wraps_lists_and_rejects_garbage(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([{"a": 1}]))
    assert load_result(tmp_path / "rows.json")["rows"] == [{"a": 1}]
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_result(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_result(tmp_path / "missing.json")
