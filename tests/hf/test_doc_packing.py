"""Whole documents packed into hidden-cache rows, each token marked prompt, text or padding."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

pytest.importorskip("transformers")

from hf_fixtures import WORDS, make_tokenizer  # noqa: E402
from multitoken.hf.doc_packing import PAD, PROMPT, TEXT, assistant_header, chat_segments, pack_documents  # noqa: E402
from multitoken.hf.loading import PretrainedError  # noqa: E402

TURNS = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}<eos>{% endfor %}"
         "{% if add_generation_prompt %}assistant{% endif %}")


def chat_tokenizer():
    tok = make_tokenizer()
    tok.chat_template = TURNS
    return tok


def test_assistant_header_and_segments_of_a_chat_text():
    tok = chat_tokenizer()
    header = assistant_header(tok)
    assert header == tok("assistant", add_special_tokens=False)["input_ids"]
    assert assistant_header(make_tokenizer()) is None  # no chat template: no header
    text = tok.apply_chat_template([{"role": "user", "content": "def x"}], tokenize=False,
                                   add_generation_prompt=True) + " return x<eos>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    words = tok.convert_ids_to_tokens(ids)
    assert words == ["user", "def", "x", "<eos>", "assistant", "return", "x", "<eos>"]
    seg = chat_segments(ids, header, tok.eos_token_id)
    assert seg.tolist() == [PROMPT] * 5 + [TEXT] * 3  # the answer through its end of turn
    # two answers in one transcript; a text without an assistant turn is plain text
    two = ids + tok("user if<eos>assistant else", add_special_tokens=False)["input_ids"]
    assert chat_segments(two, header, tok.eos_token_id).tolist() == [PROMPT] * 5 + [TEXT] * 3 + [PROMPT] * 4 + [TEXT]
    plain = tok("def x return", add_special_tokens=False)["input_ids"]
    assert chat_segments(plain, header, tok.eos_token_id).tolist() == [TEXT] * 3
    assert chat_segments(ids, None, tok.eos_token_id).tolist() == [TEXT] * len(ids)


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30), seq_len=st.integers(4, 24),
       rows=st.one_of(st.none(), st.integers(1, 12)))
def test_packing_keeps_every_document_whole_at_its_own_positions(lengths, seq_len, rows):
    tok = make_tokenizer()
    texts = [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(n)) for i, n in enumerate(lengths)]
    docs = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    if sum(map(len, docs)) < seq_len:
        with pytest.raises(PretrainedError, match="corpus too small"):
            pack_documents(tok, texts, seq_len, None)
        return
    max_tokens = None if rows is None else rows * seq_len
    packed = pack_documents(tok, texts, seq_len, max_tokens)
    n = packed.ids.size
    assert n % seq_len == 0 and packed.positions.size == packed.segments.size == n
    assert max_tokens is None or n <= max_tokens
    assert (packed.positions.reshape(-1, seq_len)[:, 0] == 0).all()  # a row never starts mid-document
    # cut the rows at position 0: the pieces are the texts' row-long pieces (the padding apart)
    starts = np.flatnonzero(packed.positions == 0).tolist() + [n]
    found = [(packed.ids[a:b].tolist(), packed.segments[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    pieces = [seg for ids, seg in found if seg[0] != PAD]
    assert all(set(seg) == {TEXT} for seg in pieces) and all(set(seg) == {PAD} for _, seg in found if seg[0] == PAD)
    expect = [d[i:i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    got = [ids for ids, seg in found if seg[0] != PAD]
    assert sorted(got) == sorted(expect[:len(got)]) if max_tokens else sorted(got) == sorted(expect)
    if rows is None:  # without a limit nothing is dropped; the padding is what first fit leaves
        assert sum(map(len, got)) == sum(map(len, docs))
