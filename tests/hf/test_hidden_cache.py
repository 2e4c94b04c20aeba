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
from multitoken.hf.doc_packing import PAD, TEXT, DocumentStates  # noqa: E402

make_model = functools.partial(hf_fixtures.make_model, vocab=128, tie=True)
TEXTS = [" ".join(WORDS[(7 * i + j) % len(WORDS)] for j in range(40 + i)) for i in range(12)]


def direct(model, tokens: torch.Tensor):
    """Reference: post-norm hidden states and greedy tokens from the full HF forward."""
    with torch.inference_mode():
        out = model(tokens, output_hidden_states=True)
        h = out.hidden_states[-1]
        assert torch.allclose(model.lm_head(h), out.logits, atol=1e-5)  # last entry is post-norm
    return h, out.logits.argmax(-1)


def row_documents(rows, r: int):
    """(start, stop) of each document (or padding run) in row r of cached rows."""
    pos = rows.positions[r].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    return list(zip(starts, starts[1:]))


def documents_alone(model, rows, docs, tol: float, eos: int) -> int:
    """Check that every document of the cached rows is one of ``docs`` (id lists), all TEXT, with
    the states and greedy tokens of that document run alone; padding is EOS. Returns the count."""
    found = 0
    for r in range(rows.tokens.shape[0]):
        for a, b in row_documents(rows, r):
            ids = rows.tokens[r, a:b]
            if rows.segments[r, a] == PAD:
                assert (rows.segments[r, a:b] == PAD).all() and (ids == eos).all()
                continue
            assert ids.tolist() in docs and (rows.segments[r, a:b] == TEXT).all()
            h_ref, g_ref = direct(model, ids[None])
            assert torch.allclose(rows.hidden[r, a:b], h_ref[0], rtol=tol, atol=tol)
            assert torch.equal(rows.greedy[r, a:b], g_ref[0])
            found += 1
    return found


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
    assert documents_alone(model, rows, docs, tol, tok.eos_token_id) > 10
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


def known(model, ids: list[int], fake: bool = False) -> DocumentStates:
    """A document with its states as the base computes them alone, or ``fake`` ones (random
    states, greedy = the ids) that only a copy can put into a cache."""
    h, g = direct(model, torch.tensor([ids]))
    if fake:
        h, g = torch.randn_like(h), torch.tensor([ids])
    return DocumentStates(np.asarray(ids, dtype=np.int64), h[0].to(torch.float16).numpy(), g[0].numpy())


@pytest.mark.parametrize("hidden_dtype", ["float16", "bfloat16"])
def test_known_states_are_copied_and_other_rows_run_the_base(tmp_path: Path, monkeypatch, hidden_dtype: str):
    model, tok = make_model(), make_tokenizer()
    eos = tok.eos_token_id
    ids = [tok(" ".join(t.split()[:5 + i]), add_special_tokens=False)["input_ids"] + [eos]
           for i, t in enumerate(TEXTS[:6])]  # 6 to 11 tokens: rows of 16 keep at most 10 free
    plain = [" ".join(t.split()[:12 + i % 4]) for i, t in enumerate(TEXTS[6:12])]  # 13 to 16 with EOS
    fakes = [known(model, x, fake=True) for x in ids]
    real, runs = hidden_cache.base_hidden_and_greedy, []
    monkeypatch.setattr(hidden_cache, "base_hidden_and_greedy",
                        lambda m, x, **kw: (runs.extend(map(tuple, x.tolist())), real(m, x, **kw))[1])
    cache = build_hidden_cache(model, tok, fakes + plain, tmp_path / "hc", seq_len=16, batch_size=1,
                               hidden_dtype=hidden_dtype, progress=False)
    rows = cache.get(range(len(cache)))
    copied = 0
    for r in range(len(cache)):
        spans = [(a, b) for a, b in row_documents(rows, r) if rows.segments[r, a] != PAD]
        fake = [next((f for f in fakes if f.ids.tolist() == rows.tokens[r, a:b].tolist()), None) for a, b in spans]
        if None in fake:
            continue
        assert tuple(rows.tokens[r].tolist()) not in runs  # known documents alone: copied, the base never ran
        for (a, b), f in zip(spans, fake):
            want = torch.from_numpy(f.hidden).float()
            assert torch.allclose(rows.hidden[r, a:b], want, rtol=0 if hidden_dtype == "float16" else 5e-3, atol=0)
            assert rows.greedy[r, a:b].tolist() == f.ids.tolist()
        copied += 1
    assert copied == 5 and len(runs) == len(cache) - copied == 6
    real_docs = [known(model, x) for x in ids]  # true states: the cache equals one the base computes
    mixed = build_hidden_cache(model, tok, real_docs + plain, tmp_path / "hc2", seq_len=16, batch_size=2,
                               hidden_dtype=hidden_dtype, progress=False)
    docs = ids + [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in plain]
    tol = 1e-2 if hidden_dtype == "float16" else 5e-2
    assert documents_alone(model, mixed.get(range(len(mixed))), docs, tol, eos) == 12


def test_known_states_are_not_used_where_they_do_not_hold(tmp_path: Path):
    """The stream layout, a cached layer input and a text longer than a row run the base (or refuse)."""
    model, tok = make_model(), make_tokenizer()
    ids = [tok(t, add_special_tokens=False)["input_ids"][:10] + [tok.eos_token_id] for t in TEXTS]
    fakes = [known(model, x, fake=True) for x in ids]
    stream = build_hidden_cache(model, tok, fakes, tmp_path / "s", seq_len=16, layout="stream", progress=False)
    h_ref, g_ref = direct(model, torch.from_numpy(stream.tokens.astype(np.int64)).view(-1, 16))
    rows = stream.get(range(len(stream)))
    assert torch.allclose(rows.hidden, h_ref, atol=1e-2) and torch.equal(rows.greedy, g_ref)
    layer = build_hidden_cache(model, tok, fakes, tmp_path / "l", seq_len=16, layer=1, progress=False)
    assert not torch.equal(layer.get([0]).hidden[0, :11], torch.from_numpy(fakes[0].hidden).float())
    with pytest.raises(PretrainedError, match="known states has 11 tokens"):
        build_hidden_cache(model, tok, fakes, tmp_path / "x", seq_len=8, progress=False)
