"""Whole documents packed into the fixed-length rows of a hidden cache, each marked by what it is.

A hidden cache row holds several texts side by side. Each text keeps its own positions (0, 1, ...)
and attends to itself alone (:func:`multitoken.model.layers.document_mask`), so every cached
hidden state is the one the base computes when that text is decoded on its own: an answer keeps
its request in view. Joining texts into one stream and cutting it into rows, as caches did
before, left the tail of most texts in a row without their beginning (their request) and the
head of the next text attending to an unrelated one.

Every token also carries a segment: :data:`TEXT` for an assistant answer (from the assistant
header of the chat template through the end of that turn) or plain (non-chat) text,
:data:`PROMPT` for the rest of a chat text (system and user turns, the header: decoding never
drafts there), :data:`PAD` for the filler at the end of a row.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Sequence

import numpy as np

from multitoken.hf.loading import PretrainedError

PAD, PROMPT, TEXT = 0, 1, 2
OPEN_ROWS = 64  # rows still being filled that a document may go into (first fit among them)
LAYOUTS = ("documents", "stream")  # texts whole, each on its own; or joined into one stream cut into rows
_SENTINEL = "\x00multitoken-user-turn\x00"


class DocumentStates(NamedTuple):
    """A tokenised document with what a hidden cache stores for it, computed elsewhere (by
    generation: :func:`multitoken.hf.distill.generate_distill_documents`), so the cache copies
    them instead of running the base: ids (L,) int64; hidden (L, d) float16 final-norm states;
    greedy (L,) int64, the base's argmax next token at each position."""
    ids: np.ndarray
    hidden: np.ndarray
    greedy: np.ndarray


class PackedDocuments(NamedTuple):
    """Rows of packed documents, flat: ids, positions (restarting at 0 in each document) and
    segments, each (rows * seq_len,); positions and segments None for the ``stream`` layout.
    known: (flat start, :class:`DocumentStates`) of each document whose states are known."""
    ids: np.ndarray  # int64
    positions: np.ndarray | None  # uint16
    segments: np.ndarray | None  # uint8: PAD, PROMPT or TEXT
    known: tuple[tuple[int, DocumentStates], ...] = ()


def text_ids(tokenizer, text: str | DocumentStates) -> list[int]:
    """A text's token ids (no special tokens added); a :class:`DocumentStates`' own ids."""
    if isinstance(text, DocumentStates):
        return text.ids.tolist()
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def pack_stream(tokenizer, texts: Iterable[str | DocumentStates], seq_len: int,
                max_tokens: int | None) -> PackedDocuments:
    """The ``stream`` layout (caches of format /1): tokenise ``texts`` (no special tokens), join
    with EOS, cut to whole ``seq_len`` rows. A row then starts inside a text and attends across the
    texts in it; every position trains. Known states are not used: they belong to a text alone."""
    eos = tokenizer.eos_token_id
    limit = None if max_tokens is None else max_tokens // seq_len * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(text_ids(tokenizer, text))
        if eos is not None:
            ids.append(eos)
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // seq_len * seq_len if limit is None else min(limit, len(ids) // seq_len * seq_len)
    if n == 0:
        raise PretrainedError(f"corpus too small: {len(ids)} tokens, need at least seq_len={seq_len}")
    return PackedDocuments(np.asarray(ids[:n], dtype=np.int64), None, None)


def assistant_header(tokenizer) -> list[int] | None:
    """Token ids that open an assistant turn in the tokenizer's chat template (for SmolLM2
    ``<|im_start|>assistant``, trailing whitespace left out because it may merge with the answer's
    first characters); None without a chat template. Its first id opens every turn."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": _SENTINEL}]
    bare = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    full = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    suffix = full[len(bare):].rstrip() if full.startswith(bare) else ""
    ids = tokenizer(suffix, add_special_tokens=False)["input_ids"] if suffix else []
    return list(ids) or None


def chat_segments(ids: Sequence[int], header: Sequence[int] | None, eos: int | None) -> np.ndarray:
    """(len(ids),) uint8 segments of one text: TEXT from the end of each assistant ``header`` through
    the next ``eos`` (the end of that turn), PROMPT for the rest of a chat text; a text without an
    assistant header (or no ``header``) is plain text, all TEXT."""
    ids = np.asarray(ids, dtype=np.int64)
    segments = np.full(len(ids), TEXT, dtype=np.uint8)
    h = len(header or ())
    ends = [s + h for s in np.flatnonzero(ids == header[0]).tolist()
            if ids[s:s + h].tolist() == list(header)] if h else []
    if not ends:
        return segments
    segments[:] = PROMPT
    stops = np.flatnonzero(ids == eos) if eos is not None else np.array([], dtype=np.int64)
    for e in ends:
        after = stops[stops >= e]
        segments[e:(int(after[0]) + 1 if len(after) else len(ids))] = TEXT
    return segments


def pack_documents(tokenizer, texts: Iterable[str | DocumentStates], seq_len: int,
                   max_tokens: int | None) -> PackedDocuments:
    """Tokenise ``texts`` (no special tokens added; EOS appended unless a text ends with it) and
    pack them whole into rows of ``seq_len`` (first fit among the last :data:`OPEN_ROWS` rows;
    a text longer than a row is cut into row-long pieces, each a document of its own), the rest
    of each row EOS padding. Stops when ``max_tokens // seq_len`` rows are full.
    A :class:`DocumentStates` goes in as it is (its ids, nothing appended; it must fit a row, since
    its states are those of the whole text) and is listed in ``known``."""
    if seq_len > np.iinfo(np.uint16).max:
        raise PretrainedError(f"seq_len {seq_len} is too long for a hidden cache (at most 65535)")
    eos = tokenizer.eos_token_id
    header = assistant_header(tokenizer)
    max_rows = None if max_tokens is None else max_tokens // seq_len
    Placed = tuple[list[int], np.ndarray, DocumentStates | None]  # ids, segments, known states
    rows: list[list[Placed]] = []  # per row: its documents
    free: list[int] = []  # tokens still free per row

    def place(doc: Placed) -> bool:
        for r in range(max(0, len(rows) - OPEN_ROWS), len(rows)):
            if free[r] >= len(doc[0]):
                break
        else:
            if max_rows is not None and len(rows) >= max_rows:
                return False
            rows.append([])
            free.append(seq_len)
            r = len(rows) - 1
        rows[r].append(doc)
        free[r] -= len(doc[0])
        return True

    for text in texts:
        known = text if isinstance(text, DocumentStates) else None
        ids = text_ids(tokenizer, text)
        if known is None and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        if known is not None and not 0 < len(ids) <= seq_len:
            raise PretrainedError(f"a text with known states has {len(ids)} tokens; a row holds 1 to {seq_len}")
        segments = chat_segments(ids, header, eos)
        pieces = [(ids[i:i + seq_len], segments[i:i + seq_len], known) for i in range(0, len(ids), seq_len)]
        if not all(place(piece) for piece in pieces):
            break
    real = len(rows) * seq_len - sum(free)
    if real < seq_len:
        raise PretrainedError(f"corpus too small: {real} tokens, need at least seq_len={seq_len}")
    pad = 0 if eos is None else eos
    out_ids, out_pos, out_seg, out_known, at = [], [], [], [], 0
    for docs, left in zip(rows, free):
        for ids, segments, known in docs:
            out_ids.append(np.asarray(ids, dtype=np.int64))
            out_pos.append(np.arange(len(ids), dtype=np.uint16))
            out_seg.append(segments)
            if known is not None:
                out_known.append((at, known))
            at += len(ids)
        if left:
            out_ids.append(np.full(left, pad, dtype=np.int64))
            out_pos.append(np.arange(left, dtype=np.uint16))
            out_seg.append(np.full(left, PAD, dtype=np.uint8))
            at += left
    return PackedDocuments(np.concatenate(out_ids), np.concatenate(out_pos), np.concatenate(out_seg),
                           tuple(out_known))
