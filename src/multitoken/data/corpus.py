"""Corpus loading and the train/val split: sources -> a fixed-order stream of documents.

Pipeline (this module, then :mod:`multitoken.data.store` and :mod:`multitoken.data.packing`)::

    iter_documents(sources)          -> Document(name, text) stream (files, folders, JSONL, stdlib)
    split_of(name, val_fraction)     -> "train" | "val", a stable hash of the document's name
    build_token_store(..., split)    -> TokenStore: flat uint16/uint32 memmap + document offsets
    PackedDataset(store, seq_len)    -> (tokens (T,), doc_ids (T,)) fixed-length windows
    batch_indices(n, step, B, seed)  -> the items of global step ``step`` for one rank
"""
from __future__ import annotations

import hashlib
import os
import re
import sysconfig
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, Sequence

from multitoken.errors import MultitokenError
from multitoken.io import json_object


class DataError(MultitokenError):
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
# One U+DC80..U+DCFF surrogate per undecodable byte (the "surrogateescape" convention).
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Entry:
    """One source file: where it is, its portable name (decides the split), whether it is JSONL."""

    path: Path
    name: str
    jsonl: bool


def norm_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    """Sorted, lower-case, dot-prefixed extensions; none at all is a DataError."""
    exts = tuple(sorted({("." + e.lstrip(".")).lower() for e in extensions}))
    if not exts:
        raise DataError("no file extensions given")
    return exts


def _walk(root: Path, prefix: str, exts: tuple[str, ...], skip: set[str]) -> list[Entry]:
    out = []
    # Sorted walk: the document order (and so the token store) is reproducible.
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise_walk_error):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if fn.startswith(".") or not fn.lower().endswith(exts):
                continue
            rel = (rel_dir / fn).as_posix()
            out.append(Entry(Path(dirpath) / fn, f"{prefix}/{rel}", fn.lower().endswith(".jsonl")))
    return out


def _raise_walk_error(err: OSError) -> None:
    raise DataError(f"cannot read directory {err.filename}: {err.strerror}")


def list_sources(sources: Sequence[str | os.PathLike] | None, extensions: Iterable[str],
                  include_tests: bool) -> list[Entry]:
    """Resolve sources to a sorted file list; names are relative so splits are portable."""
    if sources is None:
        sources = [STDLIB]
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]  # a lone path is a common slip; accept it
    if len(sources) == 0:
        raise DataError("no data sources given")
    exts = norm_extensions(extensions)
    entries: list[Entry] = []
    for src in sources:
        if str(src) == STDLIB:
            skip = _SKIP_DIRS | (set() if include_tests else _TEST_DIRS)
            found = _walk(stdlib_dir(), "stdlib", (".py",), skip)
        else:
            p = Path(src).expanduser()
            if p.is_file():
                # An explicitly named file is taken whatever its extension.
                found = [Entry(p, p.name, p.name.lower().endswith(".jsonl"))]
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


def iter_entry(entry: Entry, want: Callable[[str], bool], stats: dict) -> Iterator[Document]:
    """The documents of one source file whose name ``want`` accepts; undecodable bytes are
    counted into ``stats`` (reported once by :func:`warn_bad`)."""
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
                rec = json_object(line, where, DataError)
                if not isinstance(rec.get("text"), str):
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


def warn_bad(stats: dict) -> None:
    """One DecodeWarning for all the non-UTF-8 files counted in ``stats``."""
    if stats["files"]:
        warnings.warn(
            f"{stats['files']} file(s) were not valid UTF-8 (first: {stats['first']}); "
            f"{stats['bytes']} byte(s) replaced with U+FFFD", DecodeWarning,
            stacklevel=4)  # the caller of iter_documents / build_token_store


def _iter_docs(entries: list[Entry], want: Callable[[str], bool], max_docs: int | None,
               stats: dict) -> Iterator[Document]:
    n = 0
    try:
        for entry in entries:
            for doc in iter_entry(entry, want, stats):
                if max_docs is not None and n >= max_docs:
                    return
                n += 1
                yield doc
    finally:
        warn_bad(stats)  # once, at the end (also when the consumer stops early)


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
    entries = list_sources(sources, extensions, include_tests)
    stats = {"files": 0, "bytes": 0}
    n = 0
    for doc in _iter_docs(entries, lambda name: True, max_docs, stats):
        n += 1
        yield doc
    if n == 0:
        raise DataError(f"empty corpus: no non-empty documents in {describe_sources(sources)}")


def split_of(name: str, val_fraction: float) -> Literal["train", "val"]:
    """Deterministic split of a document by a hash of its name.

    sha256, not ``hash()``: Python's string hash is salted per process, and the split must
    be the same in every process, on every machine, forever."""
    if not 0.0 <= val_fraction <= 1.0:
        raise MultitokenError(f"val_fraction must be in [0, 1], got {val_fraction}")
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return "val" if h < val_fraction * 2.0**64 else "train"


def describe_sources(sources) -> str:
    """The sources as one readable string (for messages and the store's meta.json)."""
    if sources is None:
        return f"the standard library at {stdlib_dir()}"
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    return ", ".join(str(s) for s in sources)
