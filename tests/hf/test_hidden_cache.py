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
from multitoken.hf.doc_packing import PAD, TEXT  # noqa: E402

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
    texts = [" ".join(t.split()[:5 + 2 * (i % 6)]) for i, t in enumerate(TEXTS)]  # documents of 6 to 16 tokens
    cache = build_hidden_cache(model, tok, texts, tmp_path / "hc", seq_len=16, max_tokens=160,
                               batch_size=3, hidden_dtype=hidden_dtype, progress=False)
    assert len(cache) == 10 and cache.meta["count"] == 160 and cache.tokens.dtype == np.uint16
    batches = list(cache.batches(4))
    assert [b.hidden.shape for b in batches] == [(4, 16, 64), (4, 16, 64), (2, 16, 64)]
    rows = cache.get(range(10))
    tol = 1e-2 if hidden_dtype == "float16" else 5e-2
    assert rows.hidden.dtype == torch.float32
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    found = 0
    for r in range(10):  # each document's cached states are those of the document run alone
        pos = rows.positions[r].tolist()
        starts = [i for i, p in enumerate(pos) if p == 0] + [16]
        for a, b in zip(starts, starts[1:]):
            ids = rows.tokens[r, a:b]
            if rows.segments[r, a] == PAD:
                assert (rows.segments[r, a:b] == PAD).all() and (ids == tok.eos_token_id).all()
                continue
            assert ids.tolist() in docs and (rows.segments[r, a:b] == TEXT).all()
            h_ref, g_ref = direct(model, ids[None])
            assert torch.allclose(rows.hidden[r, a:b], h_ref[0], rtol=tol, atol=tol)
            assert torch.equal(rows.greedy[r, a:b], g_ref[0])
            found += 1
    assert found > 10
    # shuffled batches cover the same rows; an identical rebuild reuses the cache
    shuffled = torch.cat([b.tokens for b in cache.batches(4, shuffle=True, seed=1)])
    assert sorted(map(tuple, shuffled.tolist())) == sorted(map(tuple, rows.tokens.tolist()))
    again = build_hidden_cache(model, tok, texts, tmp_path / "hc", seq_len=16, max_tokens=160,
                               batch_size=3, hidden_dtype=hidden_dtype, progress=False)
    assert again.meta == cache.meta
    with pytest.raises(PretrainedError, match="different hidden cache"):
        build_hidden_cache(model, tok, texts, tmp_path / "hc", seq_len=8, progress=False)
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


def test_the_stream_layout_is_the_first_format(tmp_path: Path):
    """layout="stream" joins the texts with EOS and cuts rows (format /1, no positions or segments
    files, as caches were first built): each row is one causal sequence, every position text."""
    model, tok = make_model(), make_tokenizer()
    cache = build_hidden_cache(model, tok, TEXTS, tmp_path / "hc", seq_len=16, max_tokens=200, layout="stream",
                               progress=False)
    stream = []
    for t in TEXTS:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert cache.meta["format"] == "multitoken-hidden-cache/1" and cache.tokens.tolist() == stream[:192]
    assert not (tmp_path / "hc" / "positions.bin").exists() and not (tmp_path / "hc" / "segments.bin").exists()
    rows = HiddenCache(tmp_path / "hc").get(range(12))
    assert rows.positions is None and (rows.segments == TEXT).all()
    h_ref, g_ref = direct(model, rows.tokens)
    assert torch.allclose(rows.hidden, h_ref, rtol=1e-2, atol=1e-2) and torch.equal(rows.greedy, g_ref)
    with pytest.raises(PretrainedError, match="layout"):
        build_hidden_cache(model, tok, TEXTS, tmp_path / "x", seq_len=16, layout="rows", progress=False)
