"""Text and prompt sets: what head training reads, what self-distillation asks, what benchmarks ask.

* :func:`training_texts`: the mixed text stream a hidden-state cache is built from (stdlib train
  split, optional stdlib prose documentation, user files).
* self-distillation: train-split :func:`code_snippets` here, the broad request mix in
  :mod:`multitoken.data.requests`; :func:`multitoken.hf.distill.distill_prompts` wraps both in a chat
  template. Both are disjoint from every benchmark prompt;
* benchmark prompts: :func:`validation_prompts` (native models: raw validation-split windows),
  :data:`CODE_INSTRUCTION` + :func:`code_snippets` on the validation split and :data:`PROSE_PROMPTS`
  (chat models), :func:`read_prompts` for a user's file (the one reader of prompt files).
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence, TypeVar

from multitoken.data.corpus import STDLIB, iter_documents, split_of
from multitoken.errors import MultitokenError
from multitoken.io import json_object

T = TypeVar("T")
PROSE = "<prose>"  # data source: the English documentation topics shipped with the stdlib (pydoc_data)


def order_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def prose_documents() -> list[tuple[str, str]]:
    """(name, text) of the stdlib's English documentation topics (``pydoc_data.topics``), offline."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return [(f"pydoc_data/{k}", v) for k, v in sorted(topics.items()) if v.strip()]


def training_texts(data: Sequence[str] | None = None, val_fraction: float = 0.05, max_chars: int = 8000,
                   prose_every: int = 3) -> Iterator[str]:
    """Texts for the hidden cache, in a fixed, mixed order.

    data: sources for :func:`multitoken.data.corpus.iter_documents`; None or ``"<stdlib>"`` means the
    stdlib (its train split only: validation files by path hash are kept out, so benchmark
    prompts drawn from them are unseen), ``"<prose>"`` adds the stdlib's English documentation.
    Documents are ordered by a hash of their name (not alphabetically, which would fill a small
    budget with ``_``-modules) and cut to ``max_chars`` so that many files contribute; with prose
    each ``prose_every``-th text is a documentation topic.
    """
    sources = list(data) if data else [STDLIB]
    prose = PROSE in sources
    sources = [s for s in sources if s != PROSE]
    docs: list[tuple[str, str]] = []
    if sources:
        stdlib = [s for s in sources if s in (STDLIB, None)]
        other = [s for s in sources if s not in (STDLIB, None)]
        if stdlib:
            docs += [(d.name, d.text) for d in iter_documents(None)
                     if val_fraction == 0 or split_of(d.name, val_fraction) == "train"]
        if other:
            docs += [(d.name, d.text) for d in iter_documents(other)]
    docs.sort(key=lambda nd: order_key(nd[0]))
    extra = sorted(prose_documents(), key=lambda nd: order_key(nd[0])) if prose else []
    yield from interleave([t[:max_chars] for _, t in docs], [t[:max_chars] for _, t in extra], prose_every)


def interleave(main: Sequence[T], extra: Sequence[T], every: int) -> Iterator[T]:
    """``main`` with an item of ``extra`` as every ``every``-th item, then what remains of either
    (every=2: main[0], extra[0], main[1], extra[1], ...)."""
    i = j = 0
    while i < len(main) or j < len(extra):
        if j < len(extra) and (i >= len(main) or (i + j + 1) % every == 0):
            yield extra[j]
            j += 1
        else:
            yield main[i]
            i += 1


CODE_INSTRUCTION = "Continue this Python code:\n\n```python\n{code}```"
PROSE_PROMPTS = (  # written for this benchmark; each is one user turn in the chat template
    'Explain in a few paragraphs why the sky is blue, for a curious ten-year-old.',
    'Write a short story about a lighthouse keeper who finds a message in a bottle.',
    'What are the main causes of inflation, and how do central banks try to control it?',
    'Describe the water cycle step by step.',
    'Give me some practical advice for preparing for a job interview.',
    'Summarize the history of the printing press and why it mattered.',
    'Write a polite email to a neighbour asking them to keep their dog quiet at night.',
    'What is photosynthesis and why is it important for life on Earth?',
    'Compare living in a big city with living in the countryside.',
    'Explain how vaccines train the immune system.',
    'Write a product description for a reusable water bottle.',
    'What should a beginner know before starting to run regularly?',
)


def code_snippets(tokenizer, n: int, snippet_tokens: int = 96, val_fraction: float = 0.05,
                  split: str = "val") -> list[str]:
    """``n`` code snippets from the stdlib's ``split`` ("val": files the heads never saw), each
    about ``snippet_tokens`` tokens cut at whole lines, from a hash-chosen start line."""
    out = []
    for doc in iter_documents(None):
        if split_of(doc.name, val_fraction) != split or len(doc.text) < 8 * snippet_tokens:
            continue
        lines = doc.text.splitlines(keepends=True)
        start = int(hashlib.sha256(doc.name.encode()).hexdigest()[:8], 16) % max(1, len(lines) // 2)
        text, count = "", 0
        for line in lines[start:]:
            count += len(tokenizer.encode(line, add_special_tokens=False))
            if count > snippet_tokens:
                break
            text += line
        if text.strip() and count > snippet_tokens // 2:
            out.append(text)
        if len(out) == n:
            break
    return out


def parse_prompts(text: str, source: str) -> list[str]:
    """A user's prompts: JSONL when the first non-empty line starts with ``{`` (each object
    carries its prompt in a "prompt" or "text" string field), else one prompt per non-empty
    line, verbatim (a line starting with ``#`` is a prompt like any other, as code prompts often
    are; a prompt of several lines needs JSONL). Raises MultitokenError naming ``source`` (and
    the line) for a file without prompts or a bad record."""
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise MultitokenError(f"{source}: no prompts (one per non-empty line, or JSONL with a \"prompt\" field)")
    if not lines[0][1].lstrip().startswith("{"):
        return [ln for _, ln in lines]
    prompts = []
    for n, ln in lines:
        record = json_object(ln, f"{source}:{n}")
        value = record.get("prompt", record.get("text"))
        if not isinstance(value, str):
            raise MultitokenError(f"{source}:{n}: expected a \"prompt\" or \"text\" string field")
        prompts.append(value)
    return prompts


def read_prompt_text(path: str | Path) -> str:
    """A prompts file's UTF-8 text (unreadable or not UTF-8: MultitokenError naming it)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MultitokenError(f"cannot read prompts file {path}: {e}") from None


def read_prompts(path: str | Path) -> list[str]:
    """:func:`parse_prompts` of a UTF-8 file."""
    return parse_prompts(read_prompt_text(path), str(path))


def validation_prompts(tokenizer, n_prompts: int = 16, prompt_tokens: int = 64, sources=None) -> list[list[int]]:
    """Deterministic prompts: a window of ``prompt_tokens`` tokens from each of the first
    ``n_prompts`` validation documents (stdlib by default), cut at a line start."""
    prompts = []
    for doc in iter_documents(sources):
        if split_of(doc.name, 0.05) != "val" or len(doc.text) < 4 * prompt_tokens:
            continue
        seed = int(hashlib.sha256(doc.name.encode()).hexdigest()[:8], 16)
        lines = doc.text.splitlines(keepends=True)
        start = seed % max(1, len(lines) // 2)
        ids = tokenizer.encode("".join(lines[start:]))[:prompt_tokens]
        if len(ids) == prompt_tokens:
            prompts.append(ids)
        if len(prompts) == n_prompts:
            break
    if not prompts:
        raise MultitokenError("no validation document is long enough for a prompt")
    return prompts
