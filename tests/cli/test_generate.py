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
                 "--no-eos", "--compare", "--json", str(out), "--mode", "spec"]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] is True and stats["new_tokens"] == 24
    assert len(stats["acceptance_rates"]) == 2 and stats["speedup"] > 0 and stats["tau"] >= 1
    captured = capsys.readouterr()
    assert "identical: yes" in captured.err and len(captured.out) > 0  # text streamed to stdout


def test_the_default_mode_is_the_tree_with_prompt_lookup(ckpt, tmp_path):
    out = tmp_path / "stats.json"
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f(x):\n    return f(x)\n", "--max-new-tokens",
                 "24", "--no-eos", "--compare", "--json", str(out), "--quiet"]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] is True and stats["tree_nodes_per_step"] >= 1 and stats["prompt_lookup"] == 12


def test_generate_adaptive_draft_length(ckpt, tmp_path):
    out = tmp_path / "stats.json"
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f(x):", "--max-new-tokens", "24", "--no-eos",
                 "--draft-cost", "0.3", "--compare", "--json", str(out), "--quiet", "--mode", "spec"]) == 0
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
                 "--no-eos", "--compare", "--json", str(out), "--quiet", "--prompt-lookup", "0"]) == 0
    stats = json.loads(out.read_text())
    assert stats["identical"] and 1 < stats["tree_nodes_per_step"] <= len(paths) + 1  # tuned tree + root, cut near the end
    assert main(["generate", "--model", str(ckpt), "--prompt", "x = ", "--mode", "tree", "--tree-budget", "6",
                 "--max-new-tokens", "8", "--quiet"]) == 0


# ----------------------------------------------------------------------------- issue 14: one clear line, up front


@pytest.fixture(scope="module")
def ckpt64(tmp_path_factory):
    run = tmp_path_factory.mktemp("run64")
    save_checkpoint(run, tiny_model("sequential", n_future=3, seed=5, vocab_size=257, max_seq_len=64), ByteTokenizer())
    return run


def one_error(capsys, argv: list[str], *needles: str) -> str:
    """Run ``main(argv)``: exit 2, exactly one `error:` line on stderr holding every needle, no traceback,
    nothing on stdout (the error came before any work)."""
    code = main(argv)
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in captured.err, captured.err
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert captured.out == "", captured.out
    return errors[0]


@pytest.mark.parametrize("flags,needle", [
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--temperature", "1", "--top-p", "nan"], "--top-p must be a finite number"),
    (["--draft-cost", "nan"], "--draft-cost must be a finite number"),
    (["--draft-cost", "inf"], "--draft-cost must be a finite number"),
    (["--temperature", "1", "--top-k", "0"], "--top-k must be >= 1"),
])
def test_non_finite_settings_are_one_error_line(ckpt, capsys, flags, needle):
    one_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--max-new-tokens", "4", *flags], needle)


def test_too_long_with_truncate_left_says_what_would_fit(ckpt64, capsys):
    line = one_error(capsys, ["generate", "--model", str(ckpt64), "--prompt", "abc", "--max-new-tokens", "100",
                              "--truncate", "left"], "prompt of 3 tokens + max_new_tokens=100", "context of 64 tokens",
                     "at most 61 new tokens fit after this prompt", "at most 63 new tokens")
    assert "(use --truncate left)" not in line


def test_tune_tree_budget_error_names_the_flag(ckpt, capsys):
    one_error(capsys, ["tune-tree", "--model", str(ckpt), "--budget", "0"], "--budget must be >= 1, got 0")


def test_a_draft_model_with_a_shorter_context_fails_before_streaming(ckpt, ckpt64, capsys):
    one_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "abcdefghij", "--mode", "draft", "--draft-model",
                       str(ckpt64), "--max-new-tokens", "100", "--no-eos"],
              "exceeds the draft model's context of 64 tokens", "at most 54 new tokens")


def test_unwritable_outputs_are_refused_before_any_work(ckpt, tmp_path, capsys, monkeypatch):
    import multitoken.decoding as decoding
    (tmp_path / "dir.json").mkdir()
    one_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--json", str(tmp_path / "dir.json")],
              "is a folder")
    measured = []
    monkeypatch.setattr(decoding, "measure_topk_acceptance", lambda *a, **k: measured.append(1))
    tree = ckpt / "checkpoint" / "tree.json"
    if tree.exists():
        tree.unlink()
    tree.mkdir()
    try:
        one_error(capsys, ["tune-tree", "--model", str(ckpt), "--budget", "4"], "tree.json is a folder")
    finally:
        tree.rmdir()
    assert measured == []


@pytest.mark.parametrize("flags,needle", [
    (["--tree", "[[0],[0,0", "--mode", "spec"], "--tree applies to mode tree, not 'spec'"),
    (["--tree-budget", "4", "--mode", "ar"], "--tree-budget applies to mode tree, not 'ar'"),
    (["--draft-model", "nowhere", "--mode", "spec"], "--draft-model applies to mode draft"),
])
def test_a_flag_of_another_mode_is_an_error(ckpt, capsys, flags, needle):
    one_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", *flags], needle)


# ----------------------------------------------------------------------------- --prompts FILE: one batch


def test_prompts_file_decodes_a_batch_identical_per_row(ckpt, tmp_path, capsys):
    f = tmp_path / "p.txt"
    f.write_text("def f(x):\n\n# a comment is a prompt too\nimport os\n")
    out = tmp_path / "rows.json"
    assert main(["generate", "--model", str(ckpt), "--prompts", str(f), "--max-new-tokens", "9", "--no-eos",
                 "--compare", "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert [ln for ln in captured.out.splitlines() if ln.startswith("--- prompt")] == [
        "--- prompt 1 ---", "--- prompt 2 ---", "--- prompt 3 ---"]
    assert "batch 1/1, 3 prompts" in captured.err and "identical: yes" in captured.err
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["prompt"] for r in rows] == ["def f(x):", "# a comment is a prompt too", "import os"]
    assert all(r["identical"] and r["new_tokens"] == 9 for r in rows) and len(result["batches"]) == 1
    import torch
    from multitoken.decoding import generate
    from multitoken.training import load_model
    model, tokenizer = load_model(ckpt)
    for r in rows:  # each row equals that prompt decoded alone
        assert generate(model, [torch.tensor(tokenizer.encode(r["prompt"]))], 9).tokens[0] == r["tokens"]
        assert r["text"] == tokenizer.decode(r["tokens"]) and r["text"] in captured.out


def test_prompts_jsonl_in_batches(ckpt, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def f(x):"}\n{"text": "import os"}\n\n{"prompt": "class A:", "id": 3}\n')
    out = tmp_path / "rows.json"
    assert main(["generate", "--model", str(ckpt), "--prompts", str(f), "--batch-size", "2", "--mode", "tree",
                 "--max-new-tokens", "6", "--no-eos", "--quiet", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [b["prompts"] for b in result["batches"]] == [2, 1] and result["batch_size"] == 2
    assert [r["prompt"] for r in result["rows"]] == ["def f(x):", "import os", "class A:"]
    err = capsys.readouterr().err
    assert "batch 1/2, 2 prompts" in err and "batch 2/2, 1 prompts" in err


@pytest.mark.parametrize("content,flags,needle", [
    ('{"prompt": "a"}\nnot json\n', [], "p.txt:2: not valid JSON"),
    ('{"prompt": 3}\n', [], 'p.txt:1: expected a "prompt" or "text" string field'),
    ("\n\n", [], "p.txt: no prompts"),
    ("a\n", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("a\n", ["--prompt", "b"], "give one of --prompt, --prompt-file and --prompts"),
])
def test_bad_prompts_file_is_one_error_line(ckpt, tmp_path, capsys, content, flags, needle):
    f = tmp_path / "p.txt"
    f.write_text(content)
    one_error(capsys, ["generate", "--model", str(ckpt), "--prompts", str(f), *flags], needle)
