"""Tokenizers: a byte-level one (nothing to train) and a byte-level BPE (HF ``tokenizers``).

Both share one small protocol (:class:`Tokenizer`) and one on-disk layout: a directory
holding ``tokenizer_config.json`` (``{"type": "byte"}`` or ``{"type": "bpe", ...}``) and,
for BPE, the ``tokenizers`` serialisation ``tokenizer.json`` next to it. One function,
:func:`load_tokenizer`, loads either kind.

Both are byte-level, so every string round-trips exactly: ``decode(encode(s)) == s``.
Both reserve ``<|endoftext|>`` as ``eos_id``. Text that happens to *contain* the literal
string ``<|endoftext|>`` is encoded as ordinary text, never as the special token: corpus
data must not be able to inject control tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

from multitoken.errors import MultitokenError
from multitoken.io import atomic_write, read_json, write_json

EOS_TOKEN = "<|endoftext|>"
CONFIG_NAME = "tokenizer_config.json"  # says which kind lives in the directory
BPE_FILE = "tokenizer.json"  # the HF ``tokenizers`` serialisation of a BPE
_FORMAT_VERSION = 1


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline, the CLI and checkpoints need from a tokenizer."""

    vocab_size: int  # ids are in [0, vocab_size)
    eos_id: int  # id of <|endoftext|>

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str: ...

    def save(self, directory: str | os.PathLike) -> None: ...

    @property
    def fingerprint(self) -> str:
        """Stable hash of everything that determines the id mapping (cache keys)."""
        ...


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    out = [int(i) for i in ids]
    bad = [i for i in out if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} out of range for vocab_size {vocab_size}")
    return out


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes of the text; 256 is ``<|endoftext|>``."""

    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(t.encode("utf-8")) for t in texts]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Bytes are decoded together (multi-byte characters may span ids); invalid
        UTF-8 becomes U+FFFD. The EOS id is rendered as ``<|endoftext|>`` unless skipped."""
        parts: list[str] = []
        buf = bytearray()
        for i in _check_ids(ids, self.vocab_size):
            if i < 256:
                buf.append(i)
                continue
            # A special token ends the current byte run: flush it before rendering.
            parts.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
            if not skip_special_tokens:
                parts.append(EOS_TOKEN)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cfg = {"type": "byte", "version": _FORMAT_VERSION, "vocab_size": self.vocab_size,
               "eos_token": EOS_TOKEN}
        write_json(d / CONFIG_NAME, cfg)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(b"multitoken-byte-tokenizer-v1").hexdigest()[:16]

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257)"


class BPETokenizer:
    """Byte-level BPE from the HF ``tokenizers`` package.

    No normaliser (NFC etc. would break exact round-trips); GPT-2 style byte-level
    pre-tokenisation; the 256 byte symbols are always in the vocabulary, so any string
    can be encoded without an unknown token.
    """

    def __init__(self, tk) -> None:  # tk: tokenizers.Tokenizer
        self._tk = tk
        eos = tk.token_to_id(EOS_TOKEN)
        if eos is None:
            raise MultitokenError(f"BPE tokenizer has no {EOS_TOKEN} token")
        # Treat "<|endoftext|>" inside the input text as text, like ByteTokenizer does.
        tk.encode_special_tokens = True
        self.eos_id = int(eos)
        self.vocab_size = int(tk.get_vocab_size(with_added_tokens=True))
        self._fingerprint: str | None = None

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, show_progress: bool = False,
              min_frequency: int = 2) -> "BPETokenizer":
        """Train on a stream of texts. The result may have fewer than ``vocab_size`` ids
        when the corpus has too few distinct merges; read ``.vocab_size`` afterwards."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise MultitokenError(f"BPE vocab_size must be >= 257 (256 bytes + {EOS_TOKEN}), got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            # Seed with all 256 byte symbols, not only those seen in the corpus.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=show_progress,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON
            raise MultitokenError(f"corrupt BPE tokenizer file {path}: {e}") from None
        return cls(tk)

    def encode(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Runs in parallel inside the Rust library.
        return [e.ids for e in self._tk.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tk.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        # The model file first: a config that names it is only written once it is there.
        atomic_write(d / BPE_FILE, self._tk.to_str())
        cfg = {"type": "bpe", "version": _FORMAT_VERSION, "vocab_size": self.vocab_size,
               "eos_token": EOS_TOKEN, "file": BPE_FILE}
        write_json(d / CONFIG_NAME, cfg)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            # Canonicalise so that key order in the serialisation does not matter.
            canon = json.dumps(json.loads(self._tk.to_str()), sort_keys=True, separators=(",", ":"))
            self._fingerprint = hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]
        return self._fingerprint

    def __repr__(self) -> str:
        return f"BPETokenizer(vocab_size={self.vocab_size})"


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Load whatever :meth:`save` wrote into ``directory``.

    Raises FileNotFoundError if the directory or its files are missing, ValueError if
    they are corrupt or of an unknown kind.
    """
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {d}")
    cfg_path = d / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {d} (not a saved tokenizer)")
    try:
        cfg = read_json(cfg_path, "tokenizer config")
    except MultitokenError as e:  # the file exists (checked above): it is corrupt
        raise MultitokenError(f"corrupt {e}") from None
    kind = cfg.get("type") if isinstance(cfg, dict) else None
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        f = d / str(cfg.get("file", BPE_FILE))
        if not f.resolve().is_relative_to(d.resolve()):  # "../x.json" or "/abs": never load from elsewhere
            raise MultitokenError(f"{cfg_path}: file {cfg.get('file')!r} is outside the tokenizer folder {d}")
        if not f.is_file():
            raise FileNotFoundError(f"BPE tokenizer file missing: {f}")
        tok = BPETokenizer.from_file(f)
        want = cfg.get("vocab_size")
        if want is not None and want != tok.vocab_size:
            raise MultitokenError(f"{f}: vocab_size {tok.vocab_size} does not match {CONFIG_NAME} ({want})")
        return tok
    raise MultitokenError(f"{cfg_path}: unknown tokenizer type {kind!r} (expected 'byte' or 'bpe')")


def make_tokenizer(kind: str = "byte", texts: Iterable[str] | None = None,
                   vocab_size: int | None = None, show_progress: bool = False) -> Tokenizer:
    """``"byte"`` needs nothing; ``"bpe"`` trains on ``texts`` up to ``vocab_size`` ids."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "bpe":
        if texts is None or vocab_size is None:
            raise ValueError("a BPE tokenizer needs training texts and a vocab_size")
        return BPETokenizer.train(texts, vocab_size, show_progress=show_progress)
    raise MultitokenError(f"unknown tokenizer kind {kind!r} (expected 'byte' or 'bpe')")
