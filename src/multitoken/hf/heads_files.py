"""Heads on disk: ``heads.safetensors`` + ``heads_config.json``, and the checks that refuse heads
trained for another base (vocabulary, width, weight fingerprint) or files that are missing or corrupt.

:meth:`multitoken.hf.wrapper.MTPHeadsForCausalLM.save_heads` / ``from_heads`` read and write
through these helpers.
"""
from __future__ import annotations

from pathlib import Path

from torch import Tensor

from multitoken.errors import MultitokenError, first_line
from multitoken.io import read_json
from multitoken.model.config import MTPConfig

HEADS_WEIGHTS, HEADS_CONFIG = "heads.safetensors", "heads_config.json"
BASE_PREFIX = "base."  # trained base weights (train_base_layers) in heads.safetensors


class HeadsMismatchError(MultitokenError):
    """Heads trained for another base model or vocabulary."""


def read_heads_config(heads_dir: Path) -> tuple[dict, MTPConfig]:
    """(heads_config.json, its MTPConfig); a missing file is FileNotFoundError, a bad one MultitokenError."""
    path = heads_dir / HEADS_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {HEADS_CONFIG} in {heads_dir}: not a heads directory")
    meta = read_json(path, "heads config")
    try:
        return meta, MTPConfig.from_dict(meta["heads"])
    except (KeyError, TypeError) as e:
        raise MultitokenError(f"corrupt {path}: {first_line(e)}") from None


def read_heads_weights(heads_dir: Path) -> dict[str, Tensor]:
    """The tensors of heads.safetensors; missing is FileNotFoundError, corrupt MultitokenError."""
    from safetensors.torch import load_file
    path = heads_dir / HEADS_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {HEADS_WEIGHTS} in {heads_dir}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MultitokenError(f"corrupt {path}: {first_line(e)}") from None


def check_heads_fit(base_config, heads_dir: Path, meta: dict, cfg: MTPConfig, identity: dict | None) -> None:
    """Refuse heads whose vocabulary / width differ from the base's, or whose recorded base
    fingerprint differs from ``identity``'s (when both are known)."""
    if cfg.vocab_size != base_config.vocab_size or cfg.d_model != base_config.hidden_size:
        raise HeadsMismatchError(f"heads in {heads_dir} were trained for a base with vocab_size={cfg.vocab_size}, "
                                 f"d_model={cfg.d_model}; this base has vocab_size={base_config.vocab_size}, "
                                 f"d_model={base_config.hidden_size}")
    saved = meta.get("base") or {}
    if identity and saved.get("fingerprint") and identity.get("fingerprint") != saved["fingerprint"]:
        raise HeadsMismatchError(f"heads in {heads_dir} were trained for base {saved.get('name') or '?'} "
                                 f"(fingerprint {saved['fingerprint']}), not this one ({identity.get('fingerprint')})")


def split_base_weights(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """heads.safetensors' tensors -> (head weights, trained base weights without BASE_PREFIX)."""
    heads = {k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)}
    base = {k[len(BASE_PREFIX):]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
    return heads, base


def recorded_fingerprint(heads_dir: Path) -> str | None:
    """The base fingerprint a heads folder records (None when it records none or is unreadable)."""
    try:
        meta, _ = read_heads_config(heads_dir)
    except (OSError, MultitokenError):
        return None
    return (meta.get("base") or {}).get("fingerprint")
