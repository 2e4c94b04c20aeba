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


def test_cli_bench_decode_on_a_hf_base_in_batches(tmp_path, capsys):
    """`bench decode --base DIR --heads DIR --batch-size 2 --compare-finished` on a tiny random Llama:
    the natural requests by group, HF batched greedy first, every multitoken row identical per prompt."""
    import json

    import pytest
    import torch
    pytest.importorskip("transformers")
    from hf_fixtures import make_arch, make_tokenizer

    from multitoken.hf import MTPHeadsForCausalLM, model_identity
    from multitoken.hf.loading import save_causal_lm

    base, tok = make_arch("llama", 2, vocab=64), make_tokenizer(chat=True)
    folder = save_causal_lm(base, tok, tmp_path / "base")
    heads = MTPHeadsForCausalLM(base, 3, "sequential", identity=model_identity(base, tok))
    for p in heads.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    heads.save_heads(tmp_path / "heads")
    out = tmp_path / "decode.json"
    code = main(["bench", "decode", "--base", str(folder), "--heads", str(tmp_path / "heads"), "--batch-size", "2",
                 "--compare-finished", "--per-group", "2", "--code-prompts", "0", "--max-new-tokens", "6",
                 "--modes", "ar", "spec", "tree", "--verify-widths", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "prompt lookup decodes one prompt at a time" in captured.err
    result = json.loads(out.read_text())
    assert result["batch_size"] == 2 and result["reference"] == "hf"
    assert {r["group"] for r in result["rows"]} == {"code", "complete", "prose", "all"}
    assert [r["decoder"] for r in result["rows"] if r["group"] == "all"] == \
        ["hf", "ar", "ar:mask", "spec", "spec:mask", "tree", "tree:mask"]
    assert all(r["identical"] for r in result["rows"] if r["decoder"] != "hf")
    assert "batch size 2" in captured.out
