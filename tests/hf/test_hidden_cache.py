"""Tests for multitoken.hf.hidden_cache on a tiny random Llama and a word-level tokenizer (no network)."""
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import hf_fixtures  # noqa: E402
import multitoken.hf.hidden_cache as hidden_cache  # noqa: E402
from hf_fixtures import WORDS, make_tokenizer  # noqa: E402
from multitoken.hf import HiddenCache, PretrainedError, build_hidden_cache  # noqa: E402

make_model = functools.partial(hf_fixtures.make_model, vocab=128, tie=True)
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40 + i)) for i in range(12)]


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
    real, calls = hidden_cache.base_hidden_and_greedy, []

    def dying(m, x, **kw):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(x.shape[0])
        return real(m, x, **kw)

    monkeypatch.setattr(hidden_cache, "base_hidden_and_greedy", dying)
    with pytest.raises(KeyboardInterrupt):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", **kw)
    assert not (tmp_path / "hc").exists()  # nothing that looks complete
    with pytest.raises(PretrainedError, match="not a complete hidden cache"):
        HiddenCache(tmp_path / "hc.partial")
    monkeypatch.setattr(hidden_cache, "base_hidden_and_greedy",
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
