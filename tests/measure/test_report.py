import json
import sys

import pytest

from multitoken.cli.main import main
from multitoken.errors import MultitokenError
from multitoken.measure.report import bench_kind, find_bench_results, load_metrics, render_report

PNG = b"\x89PNG\r\n\x1a\n"


def make_run(run_dir):
    """A tiny synthetic run: 6 training rows, 2 evaluations, a truncated last line, 3 bench files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, 7):
        lines.append({"step": step * 10, "tokens": step * 2048, "lr": 1e-3, "loss": 5.0 - 0.3 * step,
                      "primary": 4.0 - 0.2 * step, "auxiliary": 3.0, "head_losses": [4.0 - 0.2 * step, 4.5, 4.8],
                      "head_accuracy": [0.1 * step / 2, 0.05, 0.02], "tokens_per_s": 1234.5})
        if step % 3 == 0:
            lines.append({"step": step * 10, "tokens": step * 2048, "split": "val", "loss": 4.9, "primary": 2.3456,
                          "head_losses": [2.3456, 3.1, 3.9], "head_accuracy": [0.4321, 0.2, 0.1]})
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 70, "tok'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    (run_dir / "config.json").write_text(json.dumps({"d_model": 32}))  # not a bench file: ignored
    decode = [{"mode": "ar", "tau": 1.0, "acceptance_rates": [], "tokens_per_s": 10.0, "speedup": 1.0,
               "identical": True, "forward_passes": 100, "new_tokens": 100, "wall_s": 10.0},
              {"mode": "spec", "tau": 2.5, "acceptance_rates": [0.75, 0.5, 0.25], "tokens_per_s": 21.3,
               "speedup": 2.13, "identical": True, "forward_passes": 40, "new_tokens": 100, "wall_s": 4.7}]
    (run_dir / "decode.json").write_text(json.dumps(decode))
    bench = run_dir / "bench"
    bench.mkdir(exist_ok=True)
    memory = {"benchmark": "memory", "date": "2026-01-01", "machine": {"cpu": "Test CPU", "cores": 2,
                                                                       "torch": "2.x", "threads": 2},
              "settings": {"vocab_size": 32768},
              "rows": [{"n_future": n, "method": m, "peak_mb": p, "step_s": 1.0 * n, "max_grad_diff": None}
                       for n, m, p in ((1, "naive", 200.0), (4, "naive", 777.7), (1, "mtp", 210.0), (4, "mtp", 222.2))]}
    (bench / "memory.json").write_text(json.dumps(memory))
    train = [{"head_type": "-", "n_future": 1, "backward": "naive", "step_s": 1.0, "tokens_per_s": 2048.0,
              "time_vs_ntp": 1.0, "peak_mb": 50.0},
             {"head_type": "residual", "n_future": 4, "backward": "mtp", "step_s": 1.11, "tokens_per_s": 1845.0,
              "time_vs_ntp": 1.11, "peak_mb": 60.0}]
    (run_dir / "train.json").write_text(json.dumps(train))
    return run_dir


def test_load_metrics_splits_and_skips_truncated_line(tmp_path):
    run = make_run(tmp_path / "run")
    train, val, bad = load_metrics(run / "metrics.jsonl")
    assert len(train) == 6 and len(val) == 2 and bad == 1


def test_bench_files_are_recognised(tmp_path):
    run = make_run(tmp_path / "run")
    found = find_bench_results(run)
    assert set(found) == {"memory", "train", "decode"}
    assert bench_kind({"rows": [{"d_model": 3}]}) is None


def test_render_report(tmp_path):
    run = make_run(tmp_path / "run")
    out = render_report(run)
    names = sorted(p.split("/")[-1] for p in out["plots"])
    assert names == ["acceptance.png", "decoding.png", "memory.png", "train_bench.png", "training_curves.png"]
    for path in out["plots"]:
        with open(path, "rb") as f:
            assert f.read(8) == PNG
    md = (run / "report" / "report.md").read_text()
    for expected in ("2.3456", "10.44", "0.432", "2.50", "2.13", "777.7", "222.2", "1 unreadable line", "Test CPU",
                     "1.110", "![training curves per head](training_curves.png)"):
        assert expected in md, expected


def test_report_without_metrics_or_with_only_metrics(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "metrics.jsonl").unlink()
    out = render_report(run, tmp_path / "out")
    assert "training_curves.png" not in " ".join(out["plots"]) and (tmp_path / "out" / "report.md").exists()
    only = tmp_path / "only"
    only.mkdir()
    (only / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0}) + "\n")
    assert len(render_report(only)["plots"]) == 1


def test_report_errors(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="nothing to report"):
        render_report(empty)
    with pytest.raises(FileNotFoundError):
        render_report(tmp_path / "missing")
    run = make_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if the plot extra were not installed
    with pytest.raises(MultitokenError, match="pip install matplotlib"):
        render_report(run)
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install matplotlib" in err[0]


def test_cli_report(tmp_path, capsys):
    run = make_run(tmp_path / "run")
    extra = tmp_path / "decode2.json"
    extra.write_text(json.dumps([{"mode": "tree", "tau": 3.0, "acceptance_rates": [0.9], "tokens_per_s": 30.0,
                                  "speedup": 3.0}]))
    assert main(["report", str(run), "--out", str(tmp_path / "r"), "--bench", str(extra)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert "| tree | 3.00 |" in (tmp_path / "r" / "report.md").read_text()
    assert main(["report", str(run), "--bench", str(tmp_path / "nope.json")]) == 2
