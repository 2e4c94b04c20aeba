import json
import pickle
import socket
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import multitoken.data.corpus as data
import multitoken.data.store as store_mod
from multitoken.data.corpus import DataError, DecodeWarning, Document, iter_documents, split_of
from multitoken.data.packing import PackedDataset, batch_indices, get_batch, steps_per_epoch
from multitoken.data.store import TokenStore, build_token_store
from multitoken.data.tokenizer import BPETokenizer, ByteTokenizer


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path) -> Path:
    """A folder of 40 small documents in nested dirs, plus files that must be skipped."""
    root = tmp_path / "corpus"
    for i in range(40):
        write(root / f"d{i % 3}" / f"doc{i:02d}.txt", f"document {i}: " + "héllo wörld " * (i % 7 + 1))
    write(root / "d0" / "image.png", b"\x89PNG\x00\x00")  # extension not in the filter
    write(root / ".git" / "HEAD.txt", "hidden dir")
    write(root / "__pycache__" / "x.txt", "cache dir")
    return root


def test_folder_recursion_and_filter(corpus):
    docs = list(iter_documents([corpus]))
    assert len(docs) == 40
    names = [d.name for d in docs]
    assert names == sorted(names)  # deterministic order
    assert all(n.startswith("corpus/d") and n.endswith(".txt") for n in names)
    assert "corpus/d1/doc01.txt" in names
    by_name = {d.name: d.text for d in docs}
    assert by_name["corpus/d1/doc01.txt"] == "document 1: " + "héllo wörld " * 2
    # Filter by extension (with or without the dot, any case).
    write(corpus / "d2" / "code.PY", "x = 1\n")
    assert [d.name for d in iter_documents([corpus], extensions=["py"])] == ["corpus/d2/code.PY"]
    # An explicitly named file is read whatever its extension.
    with pytest.warns(DecodeWarning):
        (doc,) = iter_documents([corpus / "d0" / "image.png"])
    assert doc.name == "image.png" and doc.text == "\ufffdPNG\x00\x00"


def test_max_docs_and_multiple_sources(corpus, tmp_path):
    extra = write(tmp_path / "extra.md", "# title\n")
    docs = list(iter_documents([corpus, extra]))
    assert len(docs) == 41 and docs[-1] == Document("extra.md", "# title\n")
    assert len(list(iter_documents([corpus], max_docs=3))) == 3


def test_jsonl(tmp_path):
    p = write(tmp_path / "data.jsonl", "\n".join([
        json.dumps({"text": "first ü"}),
        "",
        json.dumps({"text": "second", "id": "abc"}),
        json.dumps({"text": ""}),  # empty documents are dropped
        json.dumps({"text": "third", "meta": 1}),
    ]) + "\n")
    docs = list(iter_documents([p]))
    assert docs == [Document("data.jsonl:1", "first ü"), Document("data.jsonl:abc", "second"),
                    Document("data.jsonl:5", "third")]
    # U+2028 is a line break for str.splitlines but legal inside a JSON string;
    # a bad byte on one line is replaced and counted like in plain files.
    sep = write(tmp_path / "sep.jsonl", '{"text": "a\u2028b"}\n'.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.warns(DecodeWarning, match="1 byte"):
        assert [d.text for d in iter_documents([sep])] == ["a\u2028b", "caf\ufffd"]
    write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        list(iter_documents([tmp_path / "bad.jsonl"]))
    write(tmp_path / "notext.jsonl", '{"body": "x"}\n')
    with pytest.raises(DataError, match="'text' field"):
        list(iter_documents([tmp_path / "notext.jsonl"]))


def test_jsonl_in_folder(tmp_path):
    # Inside folders, .jsonl files are parsed as one document per line too.
    write(tmp_path / "f" / "a.jsonl", json.dumps({"text": "x"}) + "\n" + json.dumps({"text": "y"}))
    assert [d.name for d in iter_documents([tmp_path / "f"])] == ["f/a.jsonl:1", "f/a.jsonl:2"]


def test_non_utf8_replaced_with_one_warning(tmp_path):
    write(tmp_path / "c" / "a.txt", b"abc\xff\xfedef")
    write(tmp_path / "c" / "b.txt", b"caf\xe9")  # Latin-1
    write(tmp_path / "c" / "c.txt", "fine \ufffd already")  # a genuine U+FFFD is not counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = list(iter_documents([tmp_path / "c"]))
    assert [d.text for d in docs] == ["abc\ufffd\ufffddef", "caf\ufffd", "fine \ufffd already"]
    ours = [w for w in caught if issubclass(w.category, DecodeWarning)]
    assert len(ours) == 1
    assert "2 file(s)" in str(ours[0].message) and "3 byte(s)" in str(ours[0].message)


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        list(iter_documents([tmp_path / "nope"]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files with extensions"):
        list(iter_documents([tmp_path / "empty"]))
    write(tmp_path / "blank" / "a.txt", "")
    with pytest.raises(DataError, match="empty corpus"):
        list(iter_documents([tmp_path / "blank"]))
    with pytest.raises(DataError, match="no data sources"):
        list(iter_documents([]))
    f = write(tmp_path / "locked.txt", "secret")

    def deny(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match="cannot read .*locked.txt: Permission denied") as exc:
        list(iter_documents([f]))
    assert isinstance(exc.value, ValueError) and "\n" not in str(exc.value)


def test_split_deterministic_and_stable():
    names = [f"stdlib/pkg/mod{i}.py" for i in range(2000)]
    splits = [split_of(n, 0.1) for n in names]
    assert splits == [split_of(n, 0.1) for n in names]
    assert 120 < splits.count("val") < 280
    assert all(split_of(n, 0.0) == "train" for n in names[:50])
    assert all(split_of(n, 1.0) == "val" for n in names[:50])
    # Growing val_fraction only moves documents from train to val.
    assert all(split_of(n, 0.2) == "val" for n, s in zip(names, splits) if s == "val")
    # Golden values: sha256 of the name, so the split is the same in every process
    # (whatever PYTHONHASHSEED), on every machine and in every future run.
    golden = "vttvvtvvvvttttvvtvtttttvvvvtttttvtvtttttvvtttttvvtvvtvttvvtvvtvv"
    assert "".join("v" if split_of(n, 0.5) == "val" else "t" for n in names[:64]) == golden
    with pytest.raises(ValueError):
        split_of("x", 1.5)


def test_stdlib_default_corpus(tmp_path):
    docs = list(iter_documents(None, max_docs=5))
    assert len(docs) == 5
    assert all(d.name.startswith("stdlib/") and d.name.endswith(".py") for d in docs)
    names = [e.name for e in data.list_sources(None, data.DEFAULT_EXTENSIONS, include_tests=False)]
    assert len(names) > 300
    assert not any(p in {"test", "tests", "idle_test", "site-packages"}
                   for n in names for p in n.split("/")[:-1])
    store = build_token_store(None, ByteTokenizer(), "train", tmp_path, max_docs=4, progress=False)
    assert store.n_docs == 4
    train_docs = [d for d in iter_documents(None) if split_of(d.name, 0.05) == "train"][:4]
    assert store.document(3).tolist() == ByteTokenizer().encode(train_docs[3].text)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_store_roundtrip_and_cache(corpus, tmp_path, monkeypatch, kind):
    docs = list(iter_documents([corpus]))
    tok = ByteTokenizer() if kind == "byte" else BPETokenizer.train([d.text for d in docs], 320)
    cache = tmp_path / "cache"
    store = build_token_store([corpus], tok, "all", cache, progress=False, batch_chars=200)
    assert store.tokens.dtype == np.uint16 and isinstance(store.tokens, np.memmap)
    assert store.n_docs == len(docs)
    expect = np.concatenate([[tok.eos_id] + tok.encode(d.text) + [tok.eos_id] for d in docs])
    np.testing.assert_array_equal(np.asarray(store.tokens), expect)
    for i, d in enumerate(docs):
        assert store.document(i).tolist() == tok.encode(d.text)
    assert store.meta["tokenizer"] == tok.fingerprint and store.meta["n_tokens"] == len(expect)

    # Second call: nothing is tokenised again.
    monkeypatch.setattr(store_mod, "_encode_chunk", lambda *a: pytest.fail("cache not reused"))
    again = build_token_store([corpus], tok, "all", cache, progress=False)
    assert again.path == store.path
    monkeypatch.undo()
    # Editing a file changes the key.
    write(corpus / "d0" / "doc00.txt", "changed")
    assert build_token_store([corpus], tok, "all", cache, progress=False).path != store.path


def test_splits_partition_documents(corpus, tmp_path):
    tok = ByteTokenizer()
    train = build_token_store([corpus], tok, "train", tmp_path, val_fraction=0.3, progress=False)
    val = build_token_store([corpus], tok, "val", tmp_path, val_fraction=0.3, progress=False)
    everything = build_token_store([corpus], tok, "all", tmp_path, progress=False)
    assert train.path != val.path
    assert train.n_docs + val.n_docs == everything.n_docs == 40
    assert 0 < val.n_docs < 40
    val_texts = {tok.decode(val.document(i).tolist()) for i in range(val.n_docs)}
    expect = {d.text for d in iter_documents([corpus]) if split_of(d.name, 0.3) == "val"}
    assert val_texts == expect
    with pytest.raises(DataError, match="'val' split is empty"):
        build_token_store([corpus], tok, "val", tmp_path, val_fraction=0.0, progress=False)


def test_store_atomic_on_kill(corpus, tmp_path, monkeypatch):
    tok = ByteTokenizer()
    calls = []

    def killed(*args):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "_encode_chunk", killed)
    with pytest.raises(KeyboardInterrupt):
        build_token_store([corpus], tok, "all", tmp_path / "cache", progress=False, batch_chars=10)
    assert calls and list((tmp_path / "cache").iterdir()) == []  # no final store, no temp dir left
    monkeypatch.undo()
    # A temp dir left by a process that died (SIGKILL) is cleaned up by the next build.
    store = build_token_store([corpus], tok, "all", tmp_path / "cache", progress=False)
    stale = tmp_path / "cache" / f".{store.path.name}.tmp-{socket.gethostname()}-999999999-1"
    stale.mkdir()
    store.path.rename(tmp_path / "moved")
    build_token_store([corpus], tok, "all", tmp_path / "cache", progress=False)
    assert not stale.exists()


def test_corrupt_store_rebuilt(corpus, tmp_path):
    tok = ByteTokenizer()
    store = build_token_store([corpus], tok, "all", tmp_path / "cache", progress=False)
    n, path = store.n_tokens, store.path
    del store
    with open(path / TokenStore.TOKENS, "r+b") as f:
        f.truncate(10)
    with pytest.warns(UserWarning, match="rebuilding"):
        store = build_token_store([corpus], tok, "all", tmp_path / "cache", progress=False)
    assert store.n_tokens == n
    with pytest.raises(DataError, match="token store"):
        TokenStore(tmp_path / "not-a-store")
    # Pickling (spawned DataLoader workers) reopens the memmap instead of copying it.
    clone = pickle.loads(pickle.dumps(PackedDataset(store, 16)))
    assert len(pickle.dumps(store)) < 1000 and torch.equal(clone[3][0], PackedDataset(store, 16)[3][0])


class BigVocab:
    """A stub tokenizer with ids beyond uint16."""
    vocab_size = 70_000
    eos_id = 69_999
    fingerprint = "bigvocab"

    def encode(self, text):
        return [65_536 + (b % 100) for b in text.encode()]

    def decode(self, ids, skip_special_tokens=False):
        raise NotImplementedError

    def save(self, directory):
        raise NotImplementedError


def test_uint32_store(corpus, tmp_path):
    store = build_token_store([corpus], BigVocab(), "all", tmp_path, progress=False)
    assert store.tokens.dtype == np.uint32
    assert store.document(0).tolist() == BigVocab().encode(next(iter_documents([corpus])).text)


def test_packing_doc_ids(tmp_path):
    for i, n in enumerate([5, 1, 12, 3, 20, 7]):
        write(tmp_path / "c" / f"{i}.txt", "abcdefghijklmnopqrstuvwxyz"[:n])
    store = build_token_store([tmp_path / "c"], ByteTokenizer(), "all", tmp_path / "cache", progress=False)
    ds = PackedDataset(store, seq_len=8)
    assert len(ds) == store.n_tokens // 8
    tokens = torch.cat([ds[i][0] for i in range(len(ds))])
    doc_ids = torch.cat([ds[i][1] for i in range(len(ds))])
    np.testing.assert_array_equal(tokens.numpy(), np.asarray(store.tokens[: len(tokens)]))
    # Expected doc id of every position straight from the offsets.
    expect = np.repeat(np.arange(store.n_docs), np.diff(store.doc_offsets))[: len(tokens)]
    np.testing.assert_array_equal(doc_ids.numpy(), expect)
    changes = (np.nonzero(np.diff(doc_ids.numpy()))[0] + 1).tolist()
    assert changes == [int(o) for o in store.doc_offsets[1:-1] if o < len(tokens)]
    # Every document starts and ends with EOS, inside its own doc id.
    eos = ByteTokenizer().eos_id
    for c in changes:
        assert tokens[c - 1] == eos and tokens[c] == eos
    x, d = ds[-1]
    assert x.dtype == d.dtype == torch.long and x.shape == d.shape == (8,)
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_packing_with_shift_targets(tmp_path):
    targets = pytest.importorskip("multitoken.model.targets")
    for i in range(4):
        write(tmp_path / "c" / f"{i}.txt", "xy" * (i + 1))
    store = build_token_store([tmp_path / "c"], ByteTokenizer(), "all", tmp_path / "cache", progress=False)
    tokens, doc_ids = get_batch(PackedDataset(store, 16), [0])
    for i in range(3):
        t = targets.shift_targets(tokens, i, doc_ids=doc_ids)
        for pos in range(16):
            crosses = pos + i + 1 >= 16 or doc_ids[0, pos + i + 1] != doc_ids[0, pos]
            assert (t[0, pos] == -100) == bool(crosses)


def test_batch_indices_deterministic_and_epochs():
    n, bs = 103, 8
    spe = steps_per_epoch(n, bs)
    assert spe == 12
    epoch0 = [batch_indices(n, s, bs, seed=7) for s in range(spe)]
    assert epoch0 == [batch_indices(n, s, bs, seed=7) for s in range(spe)]  # resume == replay
    flat = [i for b in epoch0 for i in b]
    assert len(set(flat)) == len(flat) == spe * bs and all(0 <= i < n for i in flat)
    epoch1 = [batch_indices(n, spe + s, bs, seed=7) for s in range(spe)]
    assert epoch1 != epoch0
    assert batch_indices(n, 0, bs, seed=8) != epoch0[0]


def test_batch_indices_ranks():
    n, bs, world = 200, 4, 3
    for step in (0, 5, 16, 40):
        per_rank = [batch_indices(n, step, bs, seed=1, rank=r, world_size=world) for r in range(world)]
        flat = [i for b in per_rank for i in b]
        assert len(set(flat)) == len(flat) == bs * world
        # The union over ranks is the single-process global batch of bs * world.
        assert flat == batch_indices(n, step, bs * world, seed=1)
    with pytest.raises(ValueError):
        batch_indices(n, 0, bs, seed=1, rank=3, world_size=3)
    with pytest.raises(DataError, match="fewer than one global batch"):
        batch_indices(5, 0, 4, seed=0, world_size=2)


def test_get_batch(corpus, tmp_path):
    store = build_token_store([corpus], ByteTokenizer(), "all", tmp_path, progress=False)
    ds = PackedDataset(store, 32)
    idx = batch_indices(len(ds), 3, 4, seed=0)
    tokens, doc_ids = get_batch(ds, idx)
    assert tokens.shape == doc_ids.shape == (4, 32) and tokens.dtype == torch.long
    assert torch.equal(tokens[2], ds[idx[2]][0])
