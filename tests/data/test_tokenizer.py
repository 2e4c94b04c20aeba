import json

import pytest
from hypothesis import given, settings, strategies as st

from multitoken.data.tokenizer import (
    BPE_FILE, CONFIG_NAME, EOS_TOKEN, BPETokenizer, ByteTokenizer, Tokenizer, load_tokenizer,
    make_tokenizer,
)

SAMPLES = [
    "",
    "hello world",
    "def f(x):\n\treturn x ** 2  # square\r\n",
    "héllo wörld — naïve café",
    "日本語のテキスト, 한국어, Ελληνικά, עברית",
    "emoji 😀🚀 and combining e\u0301",
    "\x00\x01\x7f control bytes",
    f"literal {EOS_TOKEN} inside text",
]

CORPUS = [
    "import os\nimport sys\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Die Straße ist naß. Ça va très bien, merci! Größe, Übung, Ärger.\n",
    "東京は日本の首都です。 これはテストです。\n",
] * 50


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=400)


def test_byte_roundtrip_and_ids():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert ids == list(s.encode("utf-8"))
        assert tok.decode(ids) == s
    # The literal EOS string is text, not the special id.
    assert tok.eos_id not in tok.encode(EOS_TOKEN)


def test_byte_decode_special_and_invalid():
    tok = ByteTokenizer()
    ids = tok.encode("é") + [tok.eos_id] + tok.encode("x")
    assert tok.decode(ids) == "é" + EOS_TOKEN + "x"
    assert tok.decode(ids, skip_special_tokens=True) == "éx"
    # A lone continuation byte decodes to U+FFFD instead of raising.
    assert tok.decode([0xC3]) == "\ufffd"
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([257])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])


def test_byte_save_load(tmp_path):
    tok = ByteTokenizer()
    tok.save(tmp_path / "tk")
    assert json.loads((tmp_path / "tk" / CONFIG_NAME).read_text())["type"] == "byte"
    loaded = load_tokenizer(tmp_path / "tk")
    assert isinstance(loaded, ByteTokenizer)
    assert loaded.fingerprint == tok.fingerprint


def test_bpe_train_roundtrip(bpe):
    assert 257 <= bpe.vocab_size <= 400
    assert bpe.decode([bpe.eos_id]) == EOS_TOKEN
    # Merges were learnt: frequent text is shorter than its bytes.
    assert len(bpe.encode(CORPUS[0])) < len(CORPUS[0].encode()) / 2
    for s in SAMPLES + CORPUS[:4]:
        ids = bpe.encode(s)
        assert all(0 <= i < bpe.vocab_size for i in ids)
        assert bpe.decode(ids) == s
    assert bpe.eos_id not in bpe.encode(f"a{EOS_TOKEN}b")
    assert bpe.encode_batch(SAMPLES) == [bpe.encode(s) for s in SAMPLES]
    with pytest.raises(ValueError, match="out of range"):
        bpe.decode([bpe.vocab_size])


def test_bpe_save_load(bpe, tmp_path):
    bpe.save(tmp_path)
    assert (tmp_path / BPE_FILE).is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    assert (loaded.vocab_size, loaded.eos_id, loaded.fingerprint) == (bpe.vocab_size, bpe.eos_id, bpe.fingerprint)
    for s in SAMPLES:
        assert loaded.encode(s) == bpe.encode(s)
        assert loaded.decode(loaded.encode(s)) == s


def test_fingerprints_differ(bpe):
    other = BPETokenizer.train(CORPUS[:2] * 10, vocab_size=300)
    assert other.fingerprint != bpe.fingerprint != ByteTokenizer().fingerprint


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_roundtrip_property(bpe, s):
    for tok in (ByteTokenizer(), bpe):
        assert tok.decode(tok.encode(s)) == s


def test_protocol():
    assert isinstance(ByteTokenizer(), Tokenizer)
    assert isinstance(BPETokenizer.train(["ab"] * 3, 260), Tokenizer)


def test_make_tokenizer():
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    tok = make_tokenizer("bpe", texts=iter(CORPUS), vocab_size=300)
    assert isinstance(tok, BPETokenizer) and tok.vocab_size <= 300
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        make_tokenizer("wordpiece")
    with pytest.raises(ValueError, match="needs training texts"):
        make_tokenizer("bpe")
    with pytest.raises(ValueError, match=">= 257"):
        make_tokenizer("bpe", texts=CORPUS, vocab_size=100)


def test_load_errors(tmp_path, bpe):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"type": "sentencepiece"}')
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"type": "bpe"}')
    with pytest.raises(FileNotFoundError, match=BPE_FILE):
        load_tokenizer(tmp_path)
    (tmp_path / BPE_FILE).write_text('{"model": 3}')
    with pytest.raises(ValueError, match="corrupt"):
        load_tokenizer(tmp_path)
    bpe.save(tmp_path / "ok")
    cfg = json.loads((tmp_path / "ok" / CONFIG_NAME).read_text())
    cfg["vocab_size"] += 1
    (tmp_path / "ok" / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(tmp_path / "ok")


@pytest.mark.parametrize("name", ["../../x.json", "../outside.json", "/etc/passwd", "sub/../../x.json"])
def test_tokenizer_file_must_stay_in_the_model_folder(tmp_path, bpe, name):
    outside = tmp_path / "outside.json"
    bpe.save(tmp_path / "src")
    outside.write_bytes((tmp_path / "src" / BPE_FILE).read_bytes())
    model = tmp_path / "model"
    model.mkdir()
    (model / CONFIG_NAME).write_text(json.dumps({"type": "bpe", "file": name}))
    with pytest.raises(ValueError, match="outside the tokenizer folder"):
        load_tokenizer(model)
