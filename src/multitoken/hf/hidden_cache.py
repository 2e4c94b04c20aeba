"""A hidden-state cache: the frozen base's hidden states, computed once, memory-mapped for head training.

:func:`build_hidden_cache` packs tokenised texts into rows (:func:`pack_tokens`), runs the frozen
base once over them and stores its final (post-norm) hidden states, i.e. the ``lm_head`` input
(or the input of a decoder layer, when the top layers train too), and its greedy next tokens on
disk; :class:`HiddenCache` reads them back memory-mapped. A killed build resumes where it stopped.

Bad input raises :class:`~multitoken.hf.loading.PretrainedError` with a one-line message.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from multitoken.data import token_dtype
from multitoken.errors import first_line
from multitoken.hf.loading import PretrainedError, model_identity
from multitoken.io import read_json, write_json

_HIDDEN_DTYPES = ("float16", "bfloat16")


def pack_tokens(tokenizer, texts: Iterable[str], seq_len: int, max_tokens: int | None) -> np.ndarray:
    """Tokenise ``texts`` (no special tokens), join with EOS, cut to whole ``seq_len`` rows."""
    eos = tokenizer.eos_token_id
    limit = None if max_tokens is None else max_tokens // seq_len * seq_len
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if limit is not None and len(ids) >= limit:
            break
    n = len(ids) // seq_len * seq_len if limit is None else min(limit, len(ids) // seq_len * seq_len)
    if n == 0:
        raise PretrainedError(f"corpus too small: {len(ids)} tokens, need at least seq_len={seq_len}")
    return np.asarray(ids[:n], dtype=np.int64)


def hidden_at_layer(model, input_ids: Tensor, layer: int | None = None) -> tuple[Tensor, Tensor]:
    """(hidden at ``layer``, final post-norm hidden), both (B, T, d), for input_ids (B, T).
    ``layer`` None: the final one (the ``lm_head`` input); i: the input of decoder layer i."""
    out = model.base_model(input_ids=input_ids, use_cache=False, output_hidden_states=layer is not None)
    final = out.last_hidden_state
    return (final if layer is None else out.hidden_states[layer]), final


@torch.inference_mode()
def base_hidden_and_greedy(model, input_ids: Tensor, chunk: int = 1024,
                           layer: int | None = None) -> tuple[Tensor, Tensor]:
    """Hidden states at ``layer`` (:func:`hidden_at_layer`) and the greedy next tokens.

    input_ids: (B, T) long -> hidden (B, T, d) in the model dtype, greedy (B, T) long.
    The (B, T, V) logits are never materialised at once: ``lm_head`` runs on ``chunk`` rows.
    """
    hidden, final = hidden_at_layer(model, input_ids, layer)
    head = model.get_output_embeddings()
    flat = final.reshape(-1, final.shape[-1])  # (B*T, d)
    greedy = torch.cat([head(flat[i:i + chunk]).argmax(-1) for i in range(0, flat.shape[0], chunk)])
    return hidden, greedy.view(final.shape[:2])


def _check_head_input(model, input_ids: Tensor, hidden: Tensor) -> None:
    """Refuse models whose logits are not ``lm_head(last_hidden_state)`` (scaled, soft-capped...).

    Compared with a tolerance: batch 1 and batch B trunks differ in the last bits.
    """
    with torch.inference_mode():
        logits = model(input_ids=input_ids[:1], use_cache=False).logits.float()  # (1, T, V)
        mine = model.get_output_embeddings()(hidden[:1]).float()
    tol = (1e-3 if hidden.dtype == torch.float32 else 3e-2) * (1 + logits.abs().max())
    if (logits - mine).abs().max() > tol:
        raise PretrainedError(f"{model.config.model_type}: the logits are not lm_head(last hidden state); "
                              "a hidden-state cache cannot represent this model")


def build_hidden_cache(model, tokenizer, texts: Iterable[str], out_dir: str | os.PathLike,
                       seq_len: int = 256, max_tokens: int | None = None, batch_size: int = 8,
                       hidden_dtype: str = "float16", progress: bool = True,
                       layer: int | None = None) -> "HiddenCache":
    """Run the frozen base over packed sequences; store hidden states and greedy tokens.

    layer: store the input of decoder layer ``layer`` instead of the final hidden state (for
    training the layers above it, :mod:`multitoken.hf.adapt`); recorded in meta.json.

    Writes into ``<out_dir>.partial`` and renames it to ``out_dir`` when complete, so a killed
    build never looks finished; rerunning with the same inputs resumes after the last flushed
    batch. Files (N = rows * seq_len tokens, row-major):
      tokens.bin (N,) uint16/uint32 input tokens; greedy.bin (N,) the base's argmax next token
      at every position; hidden.bin (N, d) float16 or bfloat16 (stored as uint16) final-norm
      hidden states; meta.json (identity, vocab_size, d_model, seq_len, count, dtypes).
    Returns the finished :class:`HiddenCache` (an identical existing cache is reused).
    """
    if hidden_dtype not in _HIDDEN_DTYPES:
        raise PretrainedError(f"hidden_dtype must be one of {_HIDDEN_DTYPES}, got {hidden_dtype!r}")
    if seq_len < 2 or batch_size < 1:
        raise PretrainedError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")
    out = Path(out_dir).expanduser()
    ids = pack_tokens(tokenizer, texts, seq_len, max_tokens)
    plan = _cache_plan(model, tokenizer, ids, seq_len, hidden_dtype, layer)
    if (out / "meta.json").is_file():
        meta = read_json(out / "meta.json", "hidden cache meta")
        if {k: meta.get(k) for k in plan} == plan:
            return HiddenCache(out)
        raise PretrainedError(f"{out} already holds a different hidden cache: choose another folder or delete it")
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(f"{out} exists and is not a hidden cache: choose another folder")
    part = out.parent / f"{out.name}.partial"
    _fill_partial(model, ids, part, plan, batch_size, progress, layer)
    write_json(part / "meta.json", plan)
    (part / "progress.json").unlink()
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(part, out)
    return HiddenCache(out)


def _cache_plan(model, tokenizer, ids: np.ndarray, seq_len: int, hidden_dtype: str, layer: int | None) -> dict:
    """What a cache of ``ids`` (N,) holds: equal plans mean an identical cache (reuse, resume)."""
    vocab, d = int(model.config.vocab_size), int(model.config.hidden_size)
    tok_dtype = token_dtype(vocab)
    plan = {"format": "multitoken-hidden-cache/1", "identity": model_identity(model, tokenizer),
            "vocab_size": vocab, "d_model": d, "seq_len": seq_len, "count": int(ids.size),
            "rows": int(ids.size // seq_len), "token_dtype": tok_dtype.name, "hidden_dtype": hidden_dtype,
            "tokens_sha": hashlib.sha256(ids.astype(tok_dtype).tobytes()).hexdigest()[:16]}
    if layer is not None:
        plan["layer"] = int(layer)
    return plan


def _fill_partial(model, ids: np.ndarray, part: Path, plan: dict, batch_size: int, progress: bool,
                  layer: int | None) -> None:
    """Compute the rows of ``plan`` into the folder ``part``, resuming after the last batch that
    ``progress.json`` records as flushed (a different plan starts over)."""
    seq_len, d, rows = plan["seq_len"], plan["d_model"], plan["rows"]
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
    tokens = np.memmap(part / "tokens.bin", dtype=tok_dtype, mode=mode, shape=(ids.size,))
    greedy = np.memmap(part / "greedy.bin", dtype=tok_dtype, mode=mode, shape=(ids.size,))
    hidden = np.memmap(part / "hidden.bin", dtype=np.float16 if fp16 else np.uint16, mode=mode, shape=(ids.size, d))
    if not done:
        tokens[:] = ids
        tokens.flush()
        write_json(part / "progress.json", {"plan": plan, "done_rows": 0})

    from tqdm import tqdm
    bar = tqdm(total=rows * seq_len, initial=done * seq_len, unit="tok", disable=not progress,
               desc="hidden cache")
    device = next(model.parameters()).device
    checked = False
    for r0 in range(done, rows, batch_size):
        r1 = min(rows, r0 + batch_size)
        x = torch.from_numpy(ids[r0 * seq_len:r1 * seq_len].reshape(r1 - r0, seq_len)).to(device)
        h, g = base_hidden_and_greedy(model, x, layer=layer)  # (b, T, d), (b, T)
        if not checked and layer is None:
            _check_head_input(model, x, h)
            checked = True
        h = h.reshape(-1, d).float().cpu()
        if fp16:
            hidden[r0 * seq_len:r1 * seq_len] = h.to(torch.float16).numpy()
        else:
            hidden[r0 * seq_len:r1 * seq_len] = h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        greedy[r0 * seq_len:r1 * seq_len] = g.reshape(-1).cpu().numpy().astype(tok_dtype)
        hidden.flush()
        greedy.flush()  # data reaches the file before progress says so
        write_json(part / "progress.json", {"plan": plan, "done_rows": r1})
        bar.update((r1 - r0) * seq_len)
    bar.close()
    del tokens, greedy, hidden


class HiddenCache:
    """Read-only view of a :func:`build_hidden_cache` folder (memory-mapped, nothing loaded).

    Attributes: ``meta`` (dict), ``rows``, ``seq_len``, ``d_model``, ``vocab_size``, and the flat
    memmaps ``tokens`` (N,), ``greedy`` (N,), ``hidden`` (N, d) with N = rows * seq_len.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.meta = read_json(self.path / "meta.json", "hidden cache meta")
            n, d = int(self.meta["count"]), int(self.meta["d_model"])
            tok_dtype = np.dtype(self.meta["token_dtype"])
            hid_dtype = np.float16 if self.meta["hidden_dtype"] == "float16" else np.uint16
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.greedy = np.memmap(self.path / "greedy.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.hidden = np.memmap(self.path / "hidden.bin", dtype=hid_dtype, mode="r", shape=(n, d))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PretrainedError(f"{self.path} is not a complete hidden cache: {first_line(err)}") from err
        self.seq_len, self.d_model = int(self.meta["seq_len"]), d
        self.vocab_size, self.rows = int(self.meta["vocab_size"]), n // int(self.meta["seq_len"])
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

    def get(self, rows: np.ndarray | list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """Rows -> (hidden (B, T, d) float32, tokens (B, T) long, greedy (B, T) long)."""
        rows = np.asarray(rows, dtype=np.int64)
        T, d = self.seq_len, self.d_model
        flat = (rows[:, None] * T + np.arange(T)).reshape(-1)  # (B*T,)
        h = torch.from_numpy(np.ascontiguousarray(self.hidden[flat]))
        h = h.float() if h.dtype == torch.float16 else h.view(torch.bfloat16).float()
        tok = torch.from_numpy(self.tokens[flat].astype(np.int64)).view(len(rows), T)
        gr = torch.from_numpy(self.greedy[flat].astype(np.int64)).view(len(rows), T)
        return h.view(len(rows), T, d), tok, gr

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0,
                rows: np.ndarray | list[int] | None = None,
                drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Yield ``get(batch)`` over ``rows`` (default all), shuffled with ``seed`` if asked."""
        order = np.arange(self.rows) if rows is None else np.asarray(rows, dtype=np.int64)
        if shuffle:
            order = np.random.default_rng(seed).permutation(order)
        stop = len(order) - len(order) % batch_size if drop_last else len(order)
        for i in range(0, stop, batch_size):
            yield self.get(order[i:i + batch_size])
