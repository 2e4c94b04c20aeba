"""`multitoken bench memory | readme` end to end."""
from multitoken.cli.main import main
from multitoken.measure.tables import load_result


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
