"""`multitoken demo` end to end on a tiny stand-in for the real chat model (no SmolLM2 in CI)."""
import pytest

pytest.importorskip("transformers")
from hf_fixtures import make_model, make_tokenizer  # noqa: E402

from multitoken.cli.main import main  # noqa: E402
from multitoken.hf import MTPHeadsForCausalLM, model_identity  # noqa: E402


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A random Llama + chat tokenizer saved as an HF folder, and sequential heads saved for it."""
    root = tmp_path_factory.mktemp("demo")
    model, tok = make_model(eos=1), make_tokenizer(chat=True)
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    heads = MTPHeadsForCausalLM(model, n_future=3, head_type="sequential", identity=model_identity(model, tok))
    heads.save_heads(root / "heads")
    return root / "base", root / "heads"


def test_demo_answers_requests_with_every_decoder_identical(tiny_chat_model, capsys):
    base, heads = tiny_chat_model
    code = main(["demo", "--base", str(base), "--heads", str(heads), "--max-new-tokens", "12", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    for label in ("HF generate greedy", "multitoken plain", "multitoken chain", "multitoken tree"):
        line = next(ln for ln in out.splitlines() if ln.startswith(label))
        assert " yes " in line, line  # identical to HF greedy
    assert "user (code): Write a Python class called Stopwatch" in out and "user (prose):" in out
    assert "identical: every multitoken decoder emitted exactly HF greedy's tokens" in out


def test_demo_refuses_an_unknown_request_and_foreign_heads(tiny_chat_model, tmp_path, capsys):
    base, heads = tiny_chat_model
    assert main(["demo", "--base", str(base), "--heads", str(heads), "--requests", "nope"]) == 2
    assert "unknown request id 'nope'" in capsys.readouterr().err
    other = make_model(seed=1, eos=1)
    other.save_pretrained(tmp_path / "other")
    make_tokenizer(chat=True).save_pretrained(tmp_path / "other")
    capsys.readouterr()  # saving prints progress bars
    assert main(["demo", "--base", str(tmp_path / "other"), "--heads", str(heads)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "trained for base" in err[0]
