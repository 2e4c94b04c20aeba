"""Shipped heads: name resolution, 16-bit export, and the base identity check on load."""
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
from hf_fixtures import make_model, make_tokenizer  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import multitoken.hf.shipped as shipped  # noqa: E402
from multitoken.errors import MultitokenError  # noqa: E402
from multitoken.hf import HeadsMismatchError, MTPHeadsForCausalLM, model_identity  # noqa: E402


@pytest.fixture
def trained(tmp_path):
    model, tok = make_model(eos=1), make_tokenizer()
    heads = MTPHeadsForCausalLM(model, n_future=3, head_type="sequential", identity=model_identity(model, tok))
    for p in heads.heads.parameters():  # non-trivial weights, so a wrong export would show
        torch.nn.init.normal_(p, std=0.05)
    heads.save_heads(tmp_path / "run")
    (tmp_path / "run" / "tree.json").write_text('{"paths": [[0], [1], [0, 0]], "num_nodes": 3}\n')
    return model, tok, heads, tmp_path


def test_export_stores_16_bit_weights_that_load_back_for_the_same_base(trained):
    model, tok, heads, tmp = trained
    out = shipped.export_heads(tmp / "run", tmp / "ship")
    state = load_file(str(out / "heads.safetensors"))
    assert state and all(v.dtype == torch.float16 for v in state.values() if v.is_floating_point())
    assert (out / "tree.json").read_text() == (tmp / "run" / "tree.json").read_text()
    loaded = MTPHeadsForCausalLM.from_heads(model, out, model_identity(model, tok))
    for (name, a), b in zip(heads.heads.state_dict().items(), loaded.heads.state_dict().values()):
        assert b.dtype == a.dtype and torch.allclose(a, b, atol=1e-3, rtol=1e-3), name
        assert torch.equal(b, a.half().float()), name  # exactly the rounded weights, nothing else


def test_exported_heads_are_refused_for_another_base(trained):
    model, tok, heads, tmp = trained
    out = shipped.export_heads(tmp / "run", tmp / "ship")
    other = make_model(seed=7, eos=1)
    with pytest.raises(HeadsMismatchError, match="trained for base"):
        MTPHeadsForCausalLM.from_heads(other, out, model_identity(other, tok))
    fake = dict(model_identity(model, tok), fingerprint="0" * 16)  # same shapes, another base's identity
    with pytest.raises(HeadsMismatchError, match="trained for base"):
        MTPHeadsForCausalLM.from_heads(model, out, fake)


def test_resolve_heads_by_name_folder_and_base(trained, monkeypatch):
    model, tok, heads, tmp = trained
    monkeypatch.setattr(shipped, "SHIPPED_ROOT", tmp / "shipped")
    with pytest.raises(MultitokenError, match="ready-made smollm2 heads are missing"):
        shipped.resolve_heads("smollm2")
    shipped.export_heads(tmp / "run", tmp / "shipped" / "smollm2")
    assert shipped.resolve_heads("smollm2") == tmp / "shipped" / "smollm2"
    assert shipped.resolve_heads(None, base="smollm2") == tmp / "shipped" / "smollm2"
    assert shipped.shipped_heads() == ["smollm2"]
    assert shipped.resolve_heads(tmp / "run") == tmp / "run"
    with pytest.raises(MultitokenError, match="no ready-made heads for base 'gpt2'"):
        shipped.resolve_heads(None, base="gpt2")


def test_cli_refuses_foreign_truncated_and_old_format_heads(trained, tmp_path, capsys):
    """`--heads` for another base, a truncated weights file, weights of another format: one line, exit 2."""
    from safetensors.torch import save_file

    from multitoken.cli.main import main

    model, tok, heads, tmp = trained
    base = tmp / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)
    ship = shipped.export_heads(tmp / "run", tmp / "ship")
    other = tmp / "other"
    make_model(seed=3, vocab=80, eos=1).save_pretrained(other)  # another base: another vocabulary
    tok.save_pretrained(other)
    truncated = tmp / "truncated"
    shipped.export_heads(tmp / "run", truncated)
    data = (truncated / "heads.safetensors").read_bytes()
    (truncated / "heads.safetensors").write_bytes(data[: len(data) // 2])
    renamed = tmp / "renamed"  # an older layout: the same tensors under other names
    shipped.export_heads(tmp / "run", renamed)
    state = load_file(str(renamed / "heads.safetensors"))
    save_file({"old." + k: v for k, v in state.items()}, str(renamed / "heads.safetensors"))
    cases = [(other, ship, "trained for a base with vocab_size"), (base, truncated, "corrupt"),
             (base, renamed, "not heads of this format")]
    for base_dir, heads_dir, needle in cases:
        capsys.readouterr()
        code = main(["generate", "--base", str(base_dir), "--heads", str(heads_dir), "--prompt", "def x",
                     "--max-new-tokens", "2", "--mode", "spec"])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and needle in err[0], (needle, err)
