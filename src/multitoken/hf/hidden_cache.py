"""A hidden-state cache: the frozen base's hidden states, computed once, memory-mapped for head training.

:func:`build_hidden_cache` packs tokenised texts whole into rows (:func:`~multitoken.hf.doc_packing.pack_documents`:
each text at its own positions, attending to itself alone, every token marked prompt, text or
padding), runs the frozen base once over them and stores its final (post-norm) hidden states,
i.e. the ``lm_head`` input (or the input of a decoder layer, when the top layers train too), and
its greedy next tokens on disk (texts whose states generation already computed are copied);
:class:`HiddenCache` reads them back memory-mapped. A killed build resumes where it stopped.

Bad input raises :class:`~multitoken.hf.loading.PretrainedError` with a one-line message.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import Tensor

from multitoken.data import token_dtype
from multitoken.errors import first_line
from multitoken.hf.doc_packing import LAYOUTS, PAD, TEXT, DocumentStates, PackedDocuments, pack_documents, pack_stream
from multitoken.hf.loading import PretrainedError, model_identity
from multitoken.io import read_json, write_json
from multitoken.model.layers import document_mask

_HIDDEN_DTYPES = ("float16", "bfloat16")
FORMAT = "multitoken-hidden-cache/2"  # whole documents, with positions and segments
STREAM_FORMAT = "multitoken-hidden-cache/1"  # the stream layout: one joined stream cut into rows
# Tokens per cache forward (rows of seq_len tokens: BATCH_TOKENS // seq_len). SmolLM2-135M on 2 cores
# measured 8 rows x 256 at ~1000 tokens/s, 4 x 512 at 847, 8 x 512 at ~720.
BATCH_TOKENS = 2048


def packed_inputs(positions: Tensor | None) -> dict:
    """Keyword arguments that make an HF forward treat each packed document of a row on its own
    (its positions, a block-diagonal causal mask); none for plain rows (positions None)."""
    return {} if positions is None else {"position_ids": positions, "attention_mask": document_mask(positions)}


def hidden_at_layer(model, input_ids: Tensor, layer: int | None = None,
                    positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(hidden at ``layer``, final post-norm hidden), both (B, T, d), for input_ids (B, T).
    ``layer`` None: the final one (the ``lm_head`` input); i: the input of decoder layer i.
    positions (B, T): rows of packed documents, each attended to on its own."""
    out = model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=layer is not None,
                           **packed_inputs(positions))
    final = out.last_hidden_state
    return (final if layer is None else out.hidden_states[layer]), final


@torch.inference_mode()
def base_hidden_and_greedy(model, input_ids: Tensor, chunk: int = 1024, layer: int | None = None,
                           positions: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Hidden states at ``layer`` (:func:`hidden_at_layer`) and the greedy next tokens.

    input_ids, positions (optional): (B, T) long -> hidden (B, T, d) in the model dtype, greedy
    (B, T) long. The (B, T, V) logits are never materialised at once: ``lm_head`` runs on ``chunk`` rows.
    """
    hidden, final = hidden_at_layer(model, input_ids, layer, positions)
    return hidden, greedy_tokens(model, final, chunk)


def greedy_tokens(model, final: Tensor, chunk: int = 1024) -> Tensor:
    """The base head's argmax on final-norm states (B, T, d) -> (B, T) long, ``chunk`` positions
    at a time, so the (B, T, V) logits are never materialised at once."""
    head = model.get_output_embeddings()
    flat = final.reshape(-1, final.shape[-1])  # (B*T, d)
    greedy = torch.cat([head(flat[i:i + chunk]).argmax(-1) for i in range(0, flat.shape[0], chunk)])
    return greedy.view(final.shape[:2])


def check_head_input(model, input_ids: Tensor, positions: Tensor | None, hidden: Tensor) -> None:
    """Refuse models whose logits are not ``lm_head(last_hidden_state)`` (scaled, soft-capped...).

    Compared with a tolerance: batch 1 and batch B trunks differ in the last bits.
    """
    first = None if positions is None else positions[:1]
    with torch.inference_mode():
        logits = model(input_ids=input_ids[:1], use_cache=False, **packed_inputs(first)).logits.float()  # (1, T, V)
        mine = model.get_output_embeddings()(hidden[:1]).float()
    tol = (1e-3 if hidden.dtype == torch.float32 else 3e-2) * (1 + logits.abs().max())
    if (logits - mine).abs().max() > tol:
        raise PretrainedError(f"{model.config.model_type}: the logits are not lm_head(last hidden state); "
                              "a hidden-state cache cannot represent this model")


def build_hidden_cache(model, tokenizer, texts: Iterable[str | DocumentStates], out_dir: str | os.PathLike,
                       seq_len: int = 256, max_tokens: int | None = None, batch_size: int | None = None,
                       hidden_dtype: str = "float16", progress: bool = True,
                       layer: int | None = None, layout: str = "documents") -> "HiddenCache":
    """Run the frozen base over rows of packed documents; store hidden states and greedy tokens.

    texts: strings, or :class:`~multitoken.hf.doc_packing.DocumentStates` whose states generation
    already computed: in the documents layout, rows of those alone are copied, not run again.
    batch_size: rows per forward (default: :data:`BATCH_TOKENS` tokens' worth).
    layer: store the input of decoder layer ``layer`` instead of the final hidden state (for
    training the layers above it, :mod:`multitoken.hf.adapt`); recorded in meta.json.
    layout: ``documents`` (:func:`~multitoken.hf.doc_packing.pack_documents`) or ``stream``
    (:func:`~multitoken.hf.doc_packing.pack_stream`: format /1, no positions or segments files).

    Writes into ``<out_dir>.partial`` and renames it to ``out_dir`` when complete, so a killed
    build never looks finished; rerunning with the same inputs resumes after the last flushed
    batch. Files (N = rows * seq_len tokens, row-major):
      tokens.bin (N,) uint16/uint32 input tokens; positions.bin (N,) uint16 each token's position
      in its document; segments.bin (N,) uint8 PAD / PROMPT / TEXT (:mod:`~multitoken.hf.doc_packing`);
      greedy.bin (N,) the base's argmax next token at every position; hidden.bin (N, d) float16
      or bfloat16 (stored as uint16) final-norm hidden states; meta.json (identity, vocab_size,
      d_model, seq_len, count, dtypes).
    Returns the finished :class:`HiddenCache` (an identical existing cache is reused).
    """
    if hidden_dtype not in _HIDDEN_DTYPES:
        raise PretrainedError(f"hidden_dtype must be one of {_HIDDEN_DTYPES}, got {hidden_dtype!r}")
    batch_size = max(1, BATCH_TOKENS // seq_len) if batch_size is None else batch_size
    if seq_len < 2 or batch_size < 1:
        raise PretrainedError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    if layout not in LAYOUTS:
        raise PretrainedError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = Path(out_dir).expanduser()
    docs = (pack_documents if layout == "documents" else pack_stream)(tokenizer, texts, seq_len, max_tokens)
    if layer is not None:
        docs = docs._replace(known=())  # known states are final-norm ones; this cache holds a layer's input
    plan = _cache_plan(model, tokenizer, docs, seq_len, hidden_dtype, layer)
    if (out / "meta.json").is_file():
        meta = read_json(out / "meta.json", "hidden cache meta")
        if {k: meta.get(k) for k in plan} == plan:
            return HiddenCache(out)
        raise PretrainedError(f"{out} already holds a different hidden cache: choose another folder or delete it")
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(f"{out} exists and is not a hidden cache: choose another folder")
    part = out.parent / f"{out.name}.partial"
    _fill_partial(model, docs, part, plan, batch_size, progress, layer)
    write_json(part / "meta.json", plan)
    (part / "progress.json").unlink()
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(part, out)
    return HiddenCache(out)


def _cache_plan(model, tokenizer, docs: PackedDocuments, seq_len: int, hidden_dtype: str, layer: int | None) -> dict:
    """What a cache of ``docs`` holds: equal plans mean an identical cache (reuse, resume)."""
    vocab, d = int(model.config.vocab_size), int(model.config.hidden_size)
    tok_dtype = token_dtype(vocab)
    stream = docs.positions is None
    digest = hashlib.sha256(docs.ids.astype(tok_dtype).tobytes())
    if not stream:
        digest.update(docs.positions.tobytes())
        digest.update(docs.segments.tobytes())
    plan = {"format": STREAM_FORMAT if stream else FORMAT, "identity": model_identity(model, tokenizer),
            "vocab_size": vocab, "d_model": d, "seq_len": seq_len, "count": int(docs.ids.size),
            "rows": int(docs.ids.size // seq_len), "token_dtype": tok_dtype.name, "hidden_dtype": hidden_dtype,
            "tokens_sha": digest.hexdigest()[:16]}
    if not stream:
        plan["text_tokens"] = int((docs.segments == TEXT).sum())
    if layer is not None:
        plan["layer"] = int(layer)
    return plan


def _fill_partial(model, docs: PackedDocuments, part: Path, plan: dict, batch_size: int, progress: bool,
                  layer: int | None) -> None:
    """Compute the rows of ``plan`` into the folder ``part``, resuming after the last batch that
    ``progress.json`` records as flushed (a different plan starts over)."""
    seq_len, d, rows, n = plan["seq_len"], plan["d_model"], plan["rows"], plan["count"]
    tok_dtype, fp16 = np.dtype(plan["token_dtype"]), plan["hidden_dtype"] == "float16"
    done = 0
    if (part / "progress.json").is_file():
        state = read_json(part / "progress.json", "hidden cache progress")
        files = all((part / f).is_file() for f in ("tokens.bin", "greedy.bin", "hidden.bin"))
        if state.get("plan") == plan and files:
            done = int(state["done_rows"])
    mode = "r+" if done else "w+"
    if not done:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        for name, values, dtype in (("tokens", docs.ids, tok_dtype), ("positions", docs.positions, np.uint16),
                                    ("segments", docs.segments, np.uint8)):
            if values is not None:
                values.astype(dtype).tofile(part / f"{name}.bin")
    greedy = np.memmap(part / "greedy.bin", dtype=tok_dtype, mode=mode, shape=(n,))
    hidden = np.memmap(part / "hidden.bin", dtype=np.float16 if fp16 else np.uint16, mode=mode, shape=(n, d))
    if not done:
        write_json(part / "progress.json", {"plan": plan, "done_rows": 0})

    from tqdm import tqdm
    bar = tqdm(total=rows * seq_len, initial=done * seq_len, unit="tok", disable=not progress,
               desc="hidden cache")
    device = next(model.parameters()).device
    known_rows = _known_rows(docs, rows, seq_len)
    known_starts = np.array([start for start, _ in docs.known], dtype=np.int64)
    checked = False
    for r0 in range(done, rows, batch_size):
        r1 = min(rows, r0 + batch_size)
        span = slice(r0 * seq_len, r1 * seq_len)
        if known_rows[r0:r1].all():
            _copy_known(docs, known_starts, span, hidden, greedy, fp16)  # states from generation: no forward
        else:
            x = torch.from_numpy(docs.ids[span].reshape(r1 - r0, seq_len)).to(device)
            pos = None if docs.positions is None else \
                torch.from_numpy(docs.positions[span].astype(np.int64).reshape(r1 - r0, seq_len)).to(device)
            h, g = base_hidden_and_greedy(model, x, layer=layer, positions=pos)  # (b, T, d), (b, T)
            if not checked and layer is None:
                check_head_input(model, x, pos, h)
                checked = True
            hidden[span] = _stored(h.reshape(-1, d), fp16)
            greedy[span] = g.reshape(-1).cpu().numpy().astype(tok_dtype)
        hidden.flush()
        greedy.flush()  # data reaches the file before progress says so
        write_json(part / "progress.json", {"plan": plan, "done_rows": r1})
        bar.update((r1 - r0) * seq_len)
    bar.close()
    del greedy, hidden


def _stored(h: Tensor, fp16: bool) -> np.ndarray:
    """(N, d) states as hidden.bin stores them: float16, or bfloat16 bits as uint16."""
    h = h.float().cpu()
    return h.to(torch.float16).numpy() if fp16 else h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _known_rows(docs: PackedDocuments, rows: int, seq_len: int) -> np.ndarray:
    """(rows,) bool: rows whose every document has known states (their padding needs none)."""
    known = docs.segments == PAD if docs.positions is not None else np.zeros(rows * seq_len, dtype=bool)
    for start, doc in docs.known:
        known[start:start + len(doc.ids)] = True
    return known.reshape(rows, seq_len).all(1)


def _copy_known(docs: PackedDocuments, starts: np.ndarray, span: slice, hidden: np.memmap, greedy: np.memmap,
                fp16: bool) -> None:
    """Write the known states of the documents in ``span`` (whole rows; ``starts``: the ascending
    flat starts of ``docs.known``); padding gets zero states and its own token (EOS) as greedy
    token: it is never trained and no document attends to it."""
    hidden[span] = 0
    greedy[span] = docs.ids[span]
    for k in range(*np.searchsorted(starts, [span.start, span.stop])):
        start, doc = docs.known[k]
        at = slice(start, start + len(doc.ids))
        hidden[at] = doc.hidden if fp16 else _stored(torch.from_numpy(doc.hidden), fp16)
        greedy[at] = doc.greedy


class CachedRows(NamedTuple):
    """Rows of a hidden cache: hidden (B, T, d) float32; tokens, greedy, positions, segments (B, T)
    long; positions None for a stream-layout cache (one causal sequence per row)."""
    hidden: Tensor
    tokens: Tensor
    greedy: Tensor
    positions: Tensor | None
    segments: Tensor


class HiddenCache:
    """Read-only view of a :func:`build_hidden_cache` folder (memory-mapped, nothing loaded).

    Attributes: ``meta`` (dict), ``rows``, ``seq_len``, ``d_model``, ``vocab_size``, and the flat
    memmaps ``tokens``, ``greedy``, ``segments`` (N,), ``positions`` (N,) and ``hidden`` (N, d)
    with N = rows * seq_len. A stream-layout cache (format /1, one joined stream cut into rows)
    has ``positions`` None and reads as one causal sequence per row, all TEXT.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.meta = read_json(self.path / "meta.json", "hidden cache meta")
            n, d, seq_len = int(self.meta["count"]), int(self.meta["d_model"]), int(self.meta["seq_len"])
            tok_dtype = np.dtype(self.meta["token_dtype"])
            hid_dtype = np.float16 if self.meta["hidden_dtype"] == "float16" else np.uint16
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.greedy = np.memmap(self.path / "greedy.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.hidden = np.memmap(self.path / "hidden.bin", dtype=hid_dtype, mode="r", shape=(n, d))
            if self.meta.get("format") == FORMAT:
                self.positions = np.memmap(self.path / "positions.bin", dtype=np.uint16, mode="r", shape=(n,))
                self.segments = np.memmap(self.path / "segments.bin", dtype=np.uint8, mode="r", shape=(n,))
            else:
                self.positions, self.segments = None, np.full(n, TEXT, dtype=np.uint8)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PretrainedError(f"{self.path} is not a complete hidden cache: {first_line(err)}") from err
        self.seq_len, self.d_model = seq_len, d
        self.vocab_size, self.rows = int(self.meta["vocab_size"]), n // seq_len
        self.layer: int | None = self.meta.get("layer")  # None: final hidden states; i: input of layer i

    def __len__(self) -> int:
        return self.rows

    def check_model(self, model, tokenizer=None) -> None:
        """Refuse a model (and tokenizer) other than the one that built the cache."""
        mine, theirs = self.meta["identity"], model_identity(model, tokenizer)
        for key in ("vocab_size", "d_model", "fingerprint", "vocab_sha"):
            if key in theirs and mine.get(key) != theirs[key]:
                raise PretrainedError(f"hidden cache {self.path} was built by another model "
                                      f"({key}: {mine.get(key)} != {theirs[key]})")

    def get(self, rows: np.ndarray | list[int]) -> CachedRows:
        """The cached rows ``rows`` (B of them), as tensors."""
        rows = np.asarray(rows, dtype=np.int64)
        T, d = self.seq_len, self.d_model
        flat = (rows[:, None] * T + np.arange(T)).reshape(-1)  # (B*T,)
        h = torch.from_numpy(np.ascontiguousarray(self.hidden[flat]))
        h = h.float() if h.dtype == torch.float16 else h.view(torch.bfloat16).float()

        def column(values: np.ndarray) -> Tensor:
            return torch.from_numpy(values[flat].astype(np.int64)).view(len(rows), T)

        return CachedRows(h.view(len(rows), T, d), column(self.tokens), column(self.greedy),
                          None if self.positions is None else column(self.positions), column(self.segments))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                rows: np.ndarray | list[int] | None = None, drop_last: bool = False) -> Iterator[CachedRows]:
        """Yield ``get(batch)`` over ``rows`` (default all), shuffled with ``seed`` if asked."""
        order = np.arange(self.rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, stop, batch_size):
            yield self.get(order[i:i + batch_size])
