"""Checkpoints: one directory per checkpoint, written atomically.

Layout of a run directory ``out/`` and of the checkpoint inside it::

    out/checkpoint/model.safetensors   unique weight tensors (tied ones saved once, re-tied on load)
                   config.json         the MTPConfig
                   tokenizer_config.json (+ tokenizer.json for BPE)   via ``Tokenizer.save``
                   train_config.json   the TrainConfig (optional: inference-only checkpoints omit it)
                   trainer_state.pt    optimizer, scheduler, step, tokens seen, RNG (optional)
                   eval.json           the latest validation metrics (optional)
                   manifest.json       the files above, written by multitoken (``manifest.py``)
    out/metrics.jsonl                  written by the trainer, not part of the checkpoint

Atomicity: a checkpoint is written into ``checkpoint.tmp/``, then ``checkpoint/`` is renamed to
``checkpoint.old/``, ``checkpoint.tmp/`` to ``checkpoint/``, and ``checkpoint.old/`` is removed.
Each rename is atomic, so a process killed at any moment leaves ``checkpoint/`` or (between the
two renames) ``checkpoint.old/`` complete; :func:`find_checkpoint` looks at both, in that order.
A directory named ``checkpoint.tmp`` is never trusted.

Ownership: only the files a checkpoint's manifest lists are replaced or deleted. Anything else
in ``checkpoint/`` (a user's notes, the ``tree.json`` that ``tune-tree`` saves) moves into each
new checkpoint (:func:`kept_files` names them); a save that would overwrite such a file refuses
before it writes anything (:func:`check_replaceable`).

Everything here raises :class:`CheckpointError` or :class:`CheckpointNotFoundError` (also a
FileNotFoundError), both :class:`~multitoken.errors.MultitokenError`, with a one-line message.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from multitoken.model.config import MTPConfig
from multitoken.model.native import MTPModel
from multitoken.data import Tokenizer, load_tokenizer
from multitoken.data.tokenizer import BPE_FILE, CONFIG_NAME as TOKENIZER_CONFIG
from multitoken.decoding import attach_tree_hints
from multitoken.errors import MultitokenError, first_line
from multitoken.io import read_json, write_json
from multitoken.training.manifest import (
    MANIFEST, first_file, foreign_entries, move_entries, read_manifest, remove_ours, run_files, write_manifest,
)

CHECKPOINT = "checkpoint"  # name of the current checkpoint inside a run directory
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
TRAIN_CONFIG = "train_config.json"
TRAINER_STATE = "trainer_state.pt"
EVAL = "eval.json"
_TMP_SUFFIX = ".tmp"
_OLD_SUFFIX = ".old"
_TIED_KEY = "multitoken.tied"  # safetensors metadata: JSON {alias: saved name}
FORMAT_VERSION = 1
KIND = "checkpoint"  # the manifest kind of a checkpoint folder
# Every name a checkpoint may hold: never the user's (a save refuses to overwrite one it did not write).
CHECKPOINT_FILES = (WEIGHTS, MODEL_CONFIG, TOKENIZER_CONFIG, BPE_FILE, TRAIN_CONFIG, TRAINER_STATE, EVAL, MANIFEST)


class CheckpointError(MultitokenError):
    """A checkpoint exists but cannot be used (corrupt, incomplete, or does not match)."""


class CheckpointNotFoundError(MultitokenError, FileNotFoundError):
    """No checkpoint where one was expected (also a FileNotFoundError)."""


# --------------------------------------------------------------------------- weights


def unique_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, tied): every storage once, plus ``tied[alias] = saved_name`` for the others.

    safetensors refuses tensors that share memory; tied embeddings (``lm_head.weight is
    embed.weight``) are therefore saved under their first name and re-tied on load."""
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().contiguous().cpu()
    return tensors, tied


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors, tied = unique_state_dict(model)
    save_file(tensors, str(path), metadata={_TIED_KEY: json.dumps(tied), "format": "pt"})


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load ``model.safetensors`` into ``model`` (strict: same names and shapes)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"weights file missing: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        tied = json.loads(meta.get(_TIED_KEY, "{}"))
    except Exception as e:  # safetensors raises its own error types (and OSError) on bad files
        raise CheckpointError(f"corrupt weights file {path}: {first_line(e)}") from None
    for alias, name in tied.items():
        if name in tensors:
            tensors[alias] = tensors[name]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CheckpointError(f"weights in {path} do not match the model config ({what})")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"weights in {path} do not match the model config: {name} has shape "
                                  f"{tuple(t.shape)}, the config needs {tuple(expected[name].shape)}")
    # Tied parameters receive the same tensor twice: harmless, and the tie itself is kept.
    model.load_state_dict(tensors, strict=True)


# --------------------------------------------------------------------------- finding


def _is_checkpoint(d: Path) -> bool:
    return (d / WEIGHTS).is_file() and (d / MODEL_CONFIG).is_file()


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint in ``path`` (a checkpoint directory or a run directory), or None."""
    p = Path(path)
    if _is_checkpoint(p):
        return p
    for candidate in (p / CHECKPOINT, p / (CHECKPOINT + _OLD_SUFFIX)):
        if _is_checkpoint(candidate):
            return candidate
    return None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Like :func:`find_checkpoint` but raises a one-line error when there is none."""
    p = Path(path)
    found = find_checkpoint(p)
    if found is not None:
        return found
    if not p.exists():
        raise CheckpointNotFoundError(f"checkpoint not found: {p} does not exist")
    raise CheckpointNotFoundError(f"no checkpoint in {p} (expected {WEIGHTS} and {MODEL_CONFIG}, "
                                  f"or a {CHECKPOINT}/ folder holding them)")


# --------------------------------------------------------------------------- writing


def _fsync_tree(d: Path) -> None:
    """Flush file contents before the renames publish them (power loss, not only SIGKILL)."""
    for f in d.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _folders(run_dir: Path, name: str) -> tuple[Path, Path, Path]:
    """(final, old, tmp) folders of checkpoint ``name`` in ``run_dir``."""
    return run_dir / name, run_dir / (name + _OLD_SUFFIX), run_dir / (name + _TMP_SUFFIX)


def _stale_tmp_is_ours(tmp: Path) -> Path | None:
    """None when a leftover temp folder holds only what a killed save writes (our manifest, or
    without one only checkpoint file names and their atomic-write temps); else the first other entry."""
    if read_manifest(tmp, KIND) is not None:
        return None
    for p in sorted(tmp.iterdir()):
        if not any(p.name == f or (p.name.startswith(f".{f}.") and p.name.endswith(".tmp"))
                   for f in CHECKPOINT_FILES):
            return p
    return None


def check_replaceable(run_dir: str | os.PathLike, name: str = CHECKPOINT) -> None:
    """Refuse, before any work, a save into ``run_dir/name`` that would overwrite or delete a
    file the project did not write (:class:`CheckpointError` naming it)."""
    final, old, tmp = _folders(Path(run_dir), name)
    for d in (final, old, tmp):
        if (d.exists() or d.is_symlink()) and not d.is_dir():
            raise CheckpointError(f"{d} is not a folder (a checkpoint is written there); move it away")
    for d in (final, old):
        for p in foreign_entries(d, KIND):
            if p.name in CHECKPOINT_FILES:
                raise CheckpointError(f"{p} was not written by multitoken and a checkpoint would replace it; "
                                      "move it away")
    both = {p.name for p in foreign_entries(final, KIND)} & {p.name for p in foreign_entries(old, KIND)}
    if both:
        raise CheckpointError(f"{old / min(both)} was not written by multitoken and {final / min(both)} "
                              "exists too; move one of them away")
    if tmp.is_dir():
        other = _stale_tmp_is_ours(tmp)
        if other is not None:
            raise CheckpointError(f"{first_file(other)} was not written by multitoken; move it out of {tmp} "
                                  "(multitoken writes checkpoints there)")


def kept_files(ckpt: str | os.PathLike) -> list[str]:
    """Names of the entries in checkpoint folder ``ckpt`` that multitoken did not write (kept
    across saves: a user's notes, a tuned ``tree.json``)."""
    return [p.name for p in foreign_entries(Path(ckpt), KIND)]


def _commit(tmp: Path, final: Path) -> None:
    """Publish ``tmp`` as ``final``, keeping a complete checkpoint on disk at every instant and
    moving the user's entries of the folders it replaces into it (never deleting them)."""
    old = final.with_name(final.name + _OLD_SUFFIX)
    if final.exists():
        if old.exists():
            # Killed mid-commit before: keep the complete one of the two aside as `old`.
            src, dst = (old, final) if _is_checkpoint(final) else (final, old)
            move_entries(src, dst, KIND)
            if not remove_ours(src, KIND):
                raise CheckpointError(f"cannot replace {final}: {first_file(src)} is not multitoken's")
        if final.exists():
            os.rename(final, old)
    os.rename(tmp, final)
    if old.exists():
        move_entries(old, final, KIND)
        remove_ours(old, KIND)


def save_checkpoint(run_dir: str | os.PathLike, model: MTPModel, tokenizer: Tokenizer, *,
                    train_config: dict | None = None, trainer_state: dict | None = None,
                    eval_metrics: dict | None = None, name: str = CHECKPOINT) -> Path:
    """Write a checkpoint of ``model`` (+ tokenizer, + optional training state) atomically
    into ``run_dir/name`` and return that path. The previous checkpoint stays loadable until
    the new one is complete; files in it that multitoken did not write move into the new one."""
    check_vocab(model.cfg, tokenizer, "model")
    run_dir = Path(run_dir)
    check_replaceable(run_dir, name)
    run_dir.mkdir(parents=True, exist_ok=True)
    final, old, tmp = _folders(run_dir, name)
    beside = run_files(final, KIND) | run_files(old, KIND)  # what the run wrote next to it stays ours
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a killed writer (checked above: nothing else in it): never trusted
    tmp.mkdir()
    try:
        write_manifest(tmp, KIND, CHECKPOINT_FILES, beside)  # first: a killed writer's folder is known ours
        save_weights(model, tmp / WEIGHTS)
        model.cfg.save(tmp / MODEL_CONFIG)
        tokenizer.save(tmp)
        if train_config is not None:
            write_json(tmp / TRAIN_CONFIG, train_config)
        if eval_metrics is not None:
            write_json(tmp / EVAL, eval_metrics)
        if trainer_state is not None:
            torch.save({"version": FORMAT_VERSION, **trainer_state}, tmp / TRAINER_STATE)
        write_manifest(tmp, KIND, [p.name for p in tmp.iterdir()], beside)  # exactly what was written
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit(tmp, final)
    return final


# --------------------------------------------------------------------------- reading


def check_vocab(cfg: MTPConfig, tokenizer: Tokenizer, where: str) -> None:
    if cfg.vocab_size != tokenizer.vocab_size:
        raise CheckpointError(f"vocab mismatch in {where}: the model has vocab_size={cfg.vocab_size}, "
                              f"the tokenizer has {tokenizer.vocab_size}")


def load_model_config(ckpt: Path) -> MTPConfig:
    try:
        return MTPConfig.load(ckpt / MODEL_CONFIG)
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{MODEL_CONFIG} missing in {ckpt}") from None
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"bad {MODEL_CONFIG} in {ckpt}: {first_line(e)}") from None


def load_checkpoint_tokenizer(ckpt: Path) -> Tokenizer:
    try:
        return load_tokenizer(ckpt)
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"tokenizer missing in checkpoint {ckpt}: {first_line(e)}") from None
    except (ValueError, ImportError) as e:
        raise CheckpointError(f"bad tokenizer in checkpoint {ckpt}: {first_line(e)}") from None


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> tuple[MTPModel, Tokenizer]:
    """Load a trained model and its tokenizer for inference, in eval mode.

    ``path``: a checkpoint directory or a run directory (``--out`` of ``multitoken train``)."""
    ckpt = resolve_checkpoint(path)
    cfg = load_model_config(ckpt)
    tokenizer = load_checkpoint_tokenizer(ckpt)
    check_vocab(cfg, tokenizer, str(ckpt))
    model = MTPModel(cfg)
    load_weights(model, ckpt / WEIGHTS)
    model.to(device=device, dtype=dtype)
    attach_tree_hints(model, ckpt)  # a tuned tree.json becomes generate's default tree
    return model.eval(), tokenizer


def read_train_config(ckpt: Path) -> dict:
    """The ``train_config.json`` dict of a training checkpoint."""
    f = Path(ckpt) / TRAIN_CONFIG
    if not f.is_file():
        raise CheckpointNotFoundError(f"{TRAIN_CONFIG} missing in {ckpt} (an inference-only checkpoint "
                                      "cannot be resumed)")
    try:
        data = read_json(f, "train config")
    except MultitokenError as e:
        raise CheckpointError(f"corrupt {f}: {first_line(e)}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"corrupt {f}: expected a JSON object")
    return data


def read_eval(ckpt: Path) -> dict | None:
    """The checkpoint's ``eval.json`` metrics, or None when it has none (or an unreadable one)."""
    try:
        return read_json(Path(ckpt) / EVAL, "eval metrics")
    except MultitokenError:
        return None


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.pt``, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    f = Path(ckpt) / TRAINER_STATE
    if not f.is_file():
        raise CheckpointNotFoundError(f"{TRAINER_STATE} missing in {ckpt} (cannot resume from it)")
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception:  # unpickling errors come in many types; torch's text suggests unsafe loading
        raise CheckpointError(f"corrupt or not written by multitoken: {f} is not a trainer state that "
                              "loads safely (weights only); resume from another checkpoint") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"corrupt or not written by multitoken: {f} is not a trainer state")
    if state.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format version {state.get('version')}, this multitoken reads "
                              f"{FORMAT_VERSION}")
    return state
