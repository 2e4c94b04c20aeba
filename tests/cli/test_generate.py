"""`multitoken generate` and `multitoken bench decode` end to end on a tiny checkpoint."""
import json
import subprocess
import sys

import pytest

from multitoken.training import save_checkpoint
from multitoken.cli.main import main
from multitoken.data.tokenizer import ByteTokenizer
from conftest import tiny_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    model = tiny_model("sequential", n_future=3, seed=4, vocab_size=257, max_seq_len=256)
    save_checkpoint(run, model, ByteTokenizer())
    return run


def test_generate_compare_reports_identity_and_speedup(ckpt, tmp_path, capsys):
    out = tmp_path / "stats.json"
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f(x):", "--max-new-tokens", "24",
                 "--no-eos", "--compare", "--json", str(out)]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] is True and stats["new_tokens"] == 24
    assert len(stats["acceptance_rates"]) == 2 and stats["speedup"] > 0 and stats["tau"] >= 1
    captured = capsys.readouterr()
    assert "identical: yes" in captured.err and len(captured.out) > 0  # text streamed to stdout


def test_generate_adaptive_draft_length(ckpt, tmp_path):
    out = tmp_path / "stats.json"
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f(x):", "--max-new-tokens", "24", "--no-eos",
                 "--draft-cost", "0.3", "--compare", "--json", str(out), "--quiet"]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] is True and 0 <= stats["drafts_per_step"] <= 2


def test_generate_draft_mode_and_sampling(ckpt, tmp_path):
    assert main(["generate", "--model", str(ckpt), "--prompt", "import os", "--mode", "draft",
                 "--draft-model", str(ckpt), "--max-new-tokens", "8", "--quiet"]) == 0
    assert main(["generate", "--model", str(ckpt), "--prompt", "import os", "--temperature", "0.9",
                 "--top-p", "0.9", "--seed", "1", "--max-new-tokens", "8", "--quiet"]) == 0


@pytest.mark.parametrize("argv,needle", [
    (["--prompt", "x", "--max-new-tokens", "-1"], "max-new-tokens"),
    (["--prompt", "x", "--temperature", "-1"], "temperature"),
    (["--prompt", "x", "--temperature", "1", "--top-p", "2"], "top_p"),
    (["--prompt", "x", "--num-draft", "5"], "num_draft"),
    (["--prompt", ""], "empty prompt"),
    (["--prompt", "x" * 300], "exceeds the model's context"),
    (["--prompt", "x", "--mode", "draft"], "--draft-model"),
])
def test_bad_input_is_one_line_and_exit_2(ckpt, argv, needle):
    proc = subprocess.run([sys.executable, "-m", "multitoken", "generate", "--model", str(ckpt), *argv],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_checkpoint(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "multitoken", "generate", "--model", str(tmp_path / "none"),
                           "--prompt", "x"], capture_output=True, text=True)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_prompt_file_with_bad_utf8_is_replaced_with_a_warning(ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_bytes(b"def \xff\xfe(x):")
    assert main(["generate", "--model", str(ckpt), "--prompt-file", str(f), "--max-new-tokens", "4", "--quiet"]) == 0
    assert "not valid UTF-8" in capsys.readouterr().err


def test_bench_decode_writes_rows(ckpt, tmp_path, monkeypatch):
    import multitoken.data.prompts as bd
    monkeypatch.setattr(bd, "validation_prompts", lambda tok, n, k, sources=None: [tok.encode("def f(x):\n    ret")] * 2)
    out = tmp_path / "decode.json"
    code = main(["bench", "decode", "--model", str(ckpt), "--modes", "ar", "spec", "draft", "--draft-model", str(ckpt),
                 "--max-new-tokens", "16", "--json", str(out), "--markdown", str(tmp_path / "d.md")])
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert code == 0 and [r["mode"] for r in rows] == ["ar", "spec", "draft"]
    assert [c["width"] for c in result["verify_cost"]] == [1, 2, 4, 8, 16, 32]
    assert all(r["identical"] for r in rows) and rows[0]["speedup"] == 1.0
    assert "| spec |" in (tmp_path / "d.md").read_text()


def test_tune_tree_saves_a_tree_that_generate_uses(ckpt, tmp_path, monkeypatch, capsys):
    import multitoken.data.prompts as bd
    from multitoken.decoding import load_tree
    monkeypatch.setattr(bd, "validation_prompts", lambda tok, n, k, sources=None: [tok.encode("for i in range(")] * 2)
    assert main(["tune-tree", "--model", str(ckpt), "--budget", "5", "--max-new-tokens", "8"]) == 0
    paths = load_tree(ckpt / "checkpoint")
    assert 1 <= len(paths) <= 5 and "expected tau" in capsys.readouterr().out
    out = tmp_path / "tree.json"
    assert main(["generate", "--model", str(ckpt), "--prompt", "x = ", "--mode", "tree", "--max-new-tokens", "12",
                 "--no-eos", "--compare", "--json", str(out), "--quiet"]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] and 1 < stats["tree_nodes_per_step"] <= len(paths) + 1  # tuned tree + root, cut near the end
    assert main(["generate", "--model", str(ckpt), "--prompt", "x = ", "--mode", "tree", "--tree-budget", "6",
                 "--max-new-tokens", "8", "--quiet"]) == 0
