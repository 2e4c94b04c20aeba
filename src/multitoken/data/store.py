"""The on-disk token store: a tokenised split of a corpus, cached and read through a memory map.

``build_token_store(sources, tokenizer, split)`` tokenises once into ``cache_dir/<key>/`` and
returns a :class:`TokenStore`. Layout: every document is framed as ``[eos] + tokens + [eos]``.
The leading EOS acts as a BOS (the model learns how documents start), the trailing one teaches
it to end a document. Both belong to the document they frame, so ``doc_ids`` (see
:class:`multitoken.data.packing.PackedDataset`) changes exactly between the trailing EOS of one
document and the leading EOS of the next, and ``shift_targets(..., doc_ids=...)`` never asks a
head to predict across that boundary.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np

from multitoken.data.corpus import (
    DEFAULT_EXTENSIONS, DataError, Entry, describe_sources, iter_entry, list_sources, norm_extensions,
    split_of, warn_bad,
)
from multitoken.data.tokenizer import ByteTokenizer, Tokenizer
from multitoken.errors import MultitokenError
from multitoken.io import cache_dir, read_json, write_json

STORE_VERSION = 1  # part of the cache key and of meta.json: bump when the layout changes


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
            self.meta = read_json(self.path / self.META, "token store meta")
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
    """Where token stores are cached: :func:`multitoken.io.cache_dir` ``("tokens")``."""
    return cache_dir("tokens")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a ``vocab_size`` vocabulary (uint16 or uint32)."""
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
        raise MultitokenError(f"val_fraction must be in [0, 1], got {val_fraction}")
    exts = norm_extensions(extensions)
    entries = list_sources(sources, exts, include_tests)
    listing = []
    for e in entries:
        try:
            st = e.path.stat()
        except OSError as err:
            raise DataError(f"cannot read {e.path}: {err.strerror}") from None
        listing.append((e.name, st.st_size, st.st_mtime_ns))
    key_src = {
        "version": STORE_VERSION, "files": listing, "tokenizer": tokenizer.fingerprint,
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
        meta.update(sources=describe_sources(sources), key=key, extensions=list(exts),
                    include_tests=include_tests, max_docs=max_docs)
        # meta.json last: its presence marks a finished store even inside the temp dir.
        write_json(tmp / TokenStore.META, meta)
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


def _write_store(out: Path, entries: list[Entry], tokenizer: Tokenizer, split: str,
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
            for doc in iter_entry(entry, want, stats):
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
    warn_bad(stats)
    if not lengths:
        raise DataError(f"the {split!r} split is empty (val_fraction={val_fraction}, "
                        f"{len(entries)} file(s)); add more files or use JSONL with one document per line")
    np.save(out / TokenStore.OFFSETS, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    return {
        "version": STORE_VERSION, "dtype": dtype.name, "n_tokens": n_tokens, "n_docs": len(lengths),
        "vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id,
        "tokenizer": tokenizer.fingerprint, "split": split, "val_fraction": val_fraction,
        "framing": "eos-doc-eos", "n_files": len(entries),
        "non_utf8_files": stats["files"], "non_utf8_bytes": stats["bytes"],
    }
