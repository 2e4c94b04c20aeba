"""Corpus loading, train/val split, on-disk token store, packing and deterministic batching.

Pipeline::

    iter_documents(sources)          -> Document(name, text) stream (files, folders, JSONL, stdlib)
    build_token_store(..., split)    -> TokenStore: flat uint16/uint32 memmap + document offsets,
                                        cached under a key of (sources, tokenizer, split, ...)
    PackedDataset(store, seq_len)    -> (tokens (T,), doc_ids (T,)) fixed-length windows
    batch_indices(n, step, B, seed)  -> the items of global step ``step`` for one rank
    get_batch(dataset, indices)      -> (tokens (B, T), doc_ids (B, T))

Store layout: every document is framed as ``[eos] + tokens + [eos]``. The leading EOS
acts as a BOS (the model learns how documents start), the trailing one teaches it to end
a document. Both belong to the document they frame, so ``doc_ids`` changes exactly between
the trailing EOS of one document and the leading EOS of the next, and
``shift_targets(..., doc_ids=...)`` never asks a head to predict across that boundary.

Resuming training needs only the step number: ``batch_indices`` is a pure function of
(n_items, step, batch_size, seed, rank, world_size).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import socket
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from multitoken.data.tokenizer import ByteTokenizer, Tokenizer


class DataError(ValueError):
    """Bad corpus input (missing path, unreadable file, empty corpus, bad JSONL).

    The message is one line, meant to be printed as is by the CLI (exit code 2)."""


class DecodeWarning(UserWarning):
    """Some source files were not valid UTF-8 and were decoded with replacement."""


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier (relative path, ``file.jsonl:N``); decides the split
    text: str


# Source string that means "the standard library of this interpreter".
STDLIB = "<stdlib>"
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".txt", ".md", ".rst", ".tex", ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs",
    ".go", ".java", ".js", ".ts", ".sh", ".html", ".css", ".json", ".jsonl", ".toml",
    ".yaml", ".yml", ".ini", ".cfg",
)
# Never descended into, in any folder source.
_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "node_modules"}
# Test suites inside the stdlib (≈19 MB of test/ alone): excluded unless include_tests.
_TEST_DIRS = {"test", "tests", "idle_test"}
_STORE_VERSION = 1
# One U+DC80..U+DCFF surrogate per undecodable byte (the "surrogateescape" convention).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class _Entry:
    path: Path
    name: str
    jsonl: bool


def _norm_exts(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))
    if not exts:
        raise DataError("no file extensions given")
    return exts


def _walk(root: Path, prefix: str, exts: tuple[str, ...], skip: set[str]) -> list[_Entry]:
    out = []
    # Sorted walk: the document order (and so the token store) is reproducible.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(exts):
                continue
            rel = (rel_dir / fn).as_posix()
            out.append(_Entry(Path(dirpath) / fn, f"{prefix}/{rel}", fn.lower().endswith(".jsonl")))
    return out


def _raise_walk_error(err: OSError) -> None:
    raise DataError(f"cannot read directory {err.filename}: {err.strerror}")


def _list_sources(sources: Sequence[str | os.PathLike] | None, extensions: Iterable[str],
                  include_tests: bool) -> list[_Entry]:
    """Resolve sources to a sorted file list; names are relative so splits are portable."""
    if sources is None:
        sources = [STDLIB]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]  # a lone path is a common slip; accept it
    if len(sources) == 0:
        raise DataError("no data sources given")
    exts = _norm_exts(extensions)
    entries: list[_Entry] = []
    for src in sources:
        if str(src) == STDLIB:
            skip = _SKIP_DIRS | (set() if include_tests else _TEST_DIRS)
            found = _walk(stdlib_dir(), "stdlib", (".py",), skip)
        else:
            p = Path(src).expanduser()
            if p.is_file():
                # An explicitly named file is taken whatever its extension.
                found = [_Entry(p, p.name, p.name.lower().endswith(".jsonl"))]
            elif p.is_dir():
                found = _walk(p, p.resolve().name, exts, _SKIP_DIRS)
            elif p.exists():
                raise DataError(f"data source is neither a file nor a folder: {p}")
            else:
                raise DataError(f"data source not found: {p}")
        if not found:
            raise DataError(f"no files with extensions {' '.join(exts)} under {src}")
        entries.extend(found)
    return entries


def _decode(raw: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of bytes that had to be replaced by U+FFFD."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        # surrogateescape maps each bad byte to one lone surrogate: count, then replace.
        text = raw.decode("utf-8", errors="surrogateescape")
        return _ESCAPED_BYTE.subn("\ufffd", text)


def _read_error(path: Path, e: OSError) -> DataError:
    return DataError(f"cannot read {path}: {e.strerror or e}")


def _iter_entry(entry: _Entry, want: Callable[[str], bool], stats: dict) -> Iterator[Document]:
    if not entry.jsonl:
        if want(entry.name):
            try:
                raw = entry.path.read_bytes()
            except OSError as e:
                raise _read_error(entry.path, e) from None
            text, n_bad = _decode(raw)
            _count_bad(stats, entry.name, n_bad)
            if text:
                yield Document(entry.name, text)
        return
    # JSONL is streamed line by line: one file may be larger than RAM.
    n_bad_file = 0
    try:
        with open(entry.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line, n_bad = _decode(raw)
                n_bad_file += n_bad
                if not line.strip():
                    continue
                where = f"{entry.path}:{lineno}"
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise DataError(f"{where}: expected an object with a string 'text' field")
                # An explicit id keeps a record's split fixed when lines are inserted above it.
                name = f"{entry.name}:{rec.get('id', lineno)}"
                if rec["text"] and want(name):
                    yield Document(name, rec["text"])
    except OSError as e:
        raise _read_error(entry.path, e) from None
    finally:
        _count_bad(stats, entry.name, n_bad_file)


def _count_bad(stats: dict, name: str, n_bad: int) -> None:
    if n_bad:
        stats["files"] += 1
        stats["bytes"] += n_bad
        stats.setdefault("first", name)


def _warn_bad(stats: dict) -> None:
    if stats["files"]:
        warnings.warn(
            f"{stats['files']} file(s) were not valid UTF-8 (first: {stats['first']}); "
            f"{stats['bytes']} byte(s) replaced with U+FFFD", DecodeWarning,
            stacklevel=4)  # the caller of iter_documents / build_token_store


def _iter_docs(entries: list[_Entry], want: Callable[[str], bool], max_docs: int | None,
               stats: dict) -> Iterator[Document]:
    n = 0
    try:
        for entry in entries:
            for doc in _iter_entry(entry, want, stats):
                if max_docs is not None and n >= max_docs:
                    return
                n += 1
                yield doc
    finally:
        _warn_bad(stats)  # once, at the end (also when the consumer stops early)


def iter_documents(sources: Sequence[str | os.PathLike] | None = None,
                   extensions: Iterable[str] = DEFAULT_EXTENSIONS, include_tests: bool = False,
                   max_docs: int | None = None) -> Iterator[Document]:
    """Stream the documents of ``sources`` in a fixed order.

    sources: files, folders (recursive, filtered by ``extensions``), ``.jsonl`` files (one
        document per line, ``{"text": ...}``, optional ``"id"``), or :data:`STDLIB`.
        None means the standard library (``*.py``, no ``site-packages``, no test suites
        unless ``include_tests``).
    max_docs: stop after this many documents (quick tests and smoke runs).

    Non-UTF-8 bytes become U+FFFD; one :class:`DecodeWarning` reports the count.
    Raises :class:`DataError` for missing/unreadable paths, bad JSONL or an empty corpus.
    """
    entries = _list_sources(sources, extensions, include_tests)
    stats = {"files": 0, "bytes": 0}
    n = 0
    for doc in _iter_docs(entries, lambda name: True, max_docs, stats):
        n += 1
        yield doc
    if n == 0:
        raise DataError(f"empty corpus: no non-empty documents in {_describe(sources)}")


def split_of(name: str, val_fraction: float) -> Literal["train", "val"]:
    """Deterministic split of a document by a hash of its name.

    sha256, not ``hash()``: Python's string hash is salted per process, and the split must
    be the same in every process, on every machine, forever."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def _describe(sources) -> str:
    if sources is None:
        return f"the standard library at {stdlib_dir()}"
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return ", ".join(str(s) for s in sources)


# --------------------------------------------------------------------------- token store


class TokenStore:
    """A tokenised corpus on disk, read through a memory map.

    tokens: (N,) uint16/uint32 memmap, all documents framed as ``[eos] doc [eos]``.
    doc_offsets: (D + 1,) int64, document d is ``tokens[doc_offsets[d]:doc_offsets[d+1]]``.
    """

    TOKENS = "tokens.bin"
    OFFSETS = "doc_offsets.npy"
    META = "meta.json"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / self.META).read_text(encoding="utf-8"))
            self.doc_offsets = np.load(self.path / self.OFFSETS, mmap_mode="r")
            dtype = np.dtype(self.meta["dtype"])
            n = int(self.meta["n_tokens"])
            size = (self.path / self.TOKENS).stat().st_size
            ok = (size == n * dtype.itemsize and n > 0
                  and len(self.doc_offsets) == int(self.meta["n_docs"]) + 1
                  and int(self.doc_offsets[-1]) == n)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DataError(f"corrupt or incomplete token store {self.path}: {e}") from None
        if not ok:
            raise DataError(f"corrupt token store {self.path}: sizes do not match meta.json")
        self.tokens = np.memmap(self.path / self.TOKENS, dtype=dtype, mode="r", shape=(n,))

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.meta["n_docs"])

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    def document(self, d: int) -> np.ndarray:
        """Token ids of document d without its EOS framing."""
        return np.asarray(self.tokens[self.doc_offsets[d] + 1: self.doc_offsets[d + 1] - 1])

    def __len__(self) -> int:
        return self.n_tokens

    def __reduce__(self):
        # Pickle by path (DataLoader workers with spawn): never copy the token array.
        return (TokenStore, (self.path,))

    def __repr__(self) -> str:
        return f"TokenStore({self.path}, docs={self.n_docs}, tokens={self.n_tokens})"


def default_cache_dir() -> Path:
    env = os.environ.get("MULTITOKEN_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "multitoken" / "tokens"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encode_chunk(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        # Bytes are their own ids: no Python-level loop over tokens.
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(dtype) for t in texts]
    enc = getattr(tokenizer, "encode_batch", None)
    ids = enc(texts) if enc is not None else [tokenizer.encode(t) for t in texts]
    return [np.asarray(x, dtype=dtype) for x in ids]


def _cleanup_stale_tmp(cache_dir: Path, key: str) -> None:
    """Remove temp dirs of killed builders of this key (same host, dead pid)."""
    host = socket.gethostname()
    prefix = f".{key}.tmp-"
    for p in cache_dir.glob(prefix + "*"):
        try:
            owner, pid, _ = p.name[len(prefix):].rsplit("-", 2)
            if owner != host:
                continue  # a shared filesystem: we cannot tell if that builder is alive
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def build_token_store(sources: Sequence[str | os.PathLike] | None, tokenizer: Tokenizer,
                      split: Literal["train", "val", "all"] = "train",
                      cache_dir: str | os.PathLike | None = None, val_fraction: float = 0.05,
                      progress: bool = True, extensions: Iterable[str] = DEFAULT_EXTENSIONS,
                      include_tests: bool = False, max_docs: int | None = None,
                      batch_chars: int = 1 << 22) -> TokenStore:
    """Tokenise the ``split`` of ``sources`` once into ``cache_dir/<key>/`` and open it.

    The key hashes the sources (with every file's size and mtime, so edits invalidate
    it), the tokenizer fingerprint, the split, ``val_fraction``, ``extensions``,
    ``include_tests`` and ``max_docs``; a second call with the same arguments only opens
    the memmap. The store is built in a temp directory and renamed into place, so a killed
    run never leaves a store that looks complete. ``max_docs`` counts documents of
    this split. Raises :class:`DataError` on bad input or an empty split.
    """
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    exts = _norm_exts(extensions)
    entries = _list_sources(sources, exts, include_tests)
    listing = []
    for e in entries:
        try:
            st = e.path.stat()
        except OSError as err:
            raise DataError(f"cannot read {e.path}: {err.strerror}") from None
        listing.append((e.name, st.st_size, st.st_mtime_ns))
    key_src = {
        "version": _STORE_VERSION, "files": listing, "tokenizer": tokenizer.fingerprint,
        "split": split, "val_fraction": val_fraction if split != "all" else None,
        "extensions": exts, "include_tests": include_tests, "max_docs": max_docs,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / key
    if (final / TokenStore.META).is_file():
        try:
            return TokenStore(final)
        except DataError as e:  # only possible if someone edited the cache by hand
            warnings.warn(f"rebuilding {final}: {e}", stacklevel=2)
            shutil.rmtree(final, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _cleanup_stale_tmp(cache_dir, key)
    tmp = cache_dir / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    tmp.mkdir()
    try:
        meta = _write_store(tmp, entries, tokenizer, split, val_fraction, max_docs,
                            batch_chars, progress)
        meta.update(sources=_describe(sources), key=key, extensions=list(exts),
                    include_tests=include_tests, max_docs=max_docs)
        # meta.json last: its presence marks a finished store even inside the temp dir.
        (tmp / TokenStore.META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, final)  # atomic; fails if a concurrent builder won the race
        except OSError:
            if not (final / TokenStore.META).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenStore(final)


def _write_store(out: Path, entries: list[_Entry], tokenizer: Tokenizer, split: str,
                 val_fraction: float, max_docs: int | None, batch_chars: int,
                 progress: bool) -> dict:
    from tqdm import tqdm

    dtype = token_dtype(tokenizer.vocab_size)
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    want = (lambda name: True) if split == "all" else (lambda name: split_of(name, val_fraction) == split)
    stats = {"files": 0, "bytes": 0}
    lengths: list[int] = []
    n_tokens = 0
    bar = tqdm(total=len(entries), unit="file", desc=f"tokenising {split}", disable=not progress,
               leave=False)
    with open(out / TokenStore.TOKENS, "wb") as f:

        def flush(texts: list[str]) -> None:
            nonlocal n_tokens
            for ids in _encode_chunk(tokenizer, texts, dtype):
                framed = np.concatenate([eos, ids, eos])
                f.write(framed.tobytes())
                lengths.append(len(framed))
                n_tokens += len(framed)
            texts.clear()

        pending: list[str] = []
        pending_chars = 0
        # Batches of ~batch_chars characters: big enough for encode_batch to parallelise,
        # small enough to keep memory flat on corpora larger than RAM.
        n_seen = 0
        for entry in entries:
            for doc in _iter_entry(entry, want, stats):
                if max_docs is not None and n_seen >= max_docs:
                    break
                n_seen += 1
                pending.append(doc.text)
                pending_chars += len(doc.text)
                if pending_chars >= batch_chars:
                    flush(pending)
                    pending_chars = 0
                    bar.set_postfix(tokens=n_tokens, refresh=False)
            bar.update(1)
            if max_docs is not None and n_seen >= max_docs:
                break
        flush(pending)
    bar.close()
    _warn_bad(stats)
    if not lengths:
        raise DataError(f"the {split!r} split is empty (val_fraction={val_fraction}, "
                        f"{len(entries)} file(s)); add more files or use JSONL with one document per line")
    np.save(out / TokenStore.OFFSETS, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return {
        "version": _STORE_VERSION, "dtype": dtype.name, "n_tokens": n_tokens, "n_docs": len(lengths),
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.fingerprint, "split": split, "val_fraction": val_fraction,
        "framing": "eos-doc-eos", "n_files": len(entries),
        "non_utf8_files": stats["files"], "non_utf8_bytes": stats["bytes"],
    }


# --------------------------------------------------------------------------- packing


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq_len`` tokens over the concatenated store.

    Item i is ``tokens[i*seq_len : (i+1)*seq_len]``; the tail shorter than ``seq_len``
    is dropped. ``doc_ids`` holds the store's document index of each token.
    """

    def __init__(self, store: TokenStore, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.store = store
        self.seq_len = seq_len
        # Offsets are small (one int64 per document): keep them in RAM for searchsorted.
        self._offsets = np.asarray(store.doc_offsets, dtype=np.int64)

    def __len__(self) -> int:
        return self.store.n_tokens // self.seq_len

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        """Returns tokens (seq_len,) long and doc_ids (seq_len,) long."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"item {i} out of range for {n} sequences")
        start = i * self.seq_len
        tokens = np.asarray(self.store.tokens[start:start + self.seq_len], dtype=np.int64)
        pos = np.arange(start, start + self.seq_len)
        doc_ids = np.searchsorted(self._offsets, pos, side="right") - 1  # (T,)
        return torch.from_numpy(tokens), torch.from_numpy(doc_ids.astype(np.int64))


# --------------------------------------------------------------------------- batching


def steps_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch (the partial last batch is dropped)."""
    return n_items // (batch_size * world_size)


@functools.lru_cache(maxsize=2)
def _epoch_perm(n_items: int, seed: int, epoch: int) -> np.ndarray:
    # numpy's PCG64 stream is stable across releases, and (seed, epoch) seeds it directly.
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)
    perm.flags.writeable = False
    return perm


def batch_indices(n_items: int, step: int, batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[int]:
    """Items of global step ``step`` for ``rank``: a pure function, so resuming needs the
    step only. Each epoch is a fresh permutation seeded by (seed, epoch); step s takes the
    s-th global batch of ``batch_size * world_size`` items and rank r its r-th slice, so
    ranks are disjoint within a step and no item repeats within an epoch."""
    if batch_size < 1 or world_size < 1:
        raise ValueError(f"batch_size and world_size must be >= 1, got {batch_size}, {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world_size {world_size}")
    if step < 0 or seed < 0:
        raise ValueError(f"step and seed must be >= 0, got {step}, {seed}")
    spe = steps_per_epoch(n_items, batch_size, world_size)
    if spe == 0:
        raise DataError(f"{n_items} sequences are fewer than one global batch of "
                        f"{batch_size * world_size}; use more data or a smaller batch/seq_len")
    epoch, within = divmod(step, spe)
    g = batch_size * world_size
    start = within * g + rank * batch_size
    return _epoch_perm(n_items, seed, epoch)[start:start + batch_size].tolist()


def get_batch(dataset: PackedDataset, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Stack items into tokens (B, T) long and doc_ids (B, T) long."""
    items = [dataset[i] for i in indices]
    return torch.stack([t for t, _ in items]), torch.stack([d for _, d in items])
