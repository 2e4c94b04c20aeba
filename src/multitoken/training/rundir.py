"""The run folder (``--out``): checked before any work, claimed when training starts.

A run folder is ours when it holds a checkpoint folder of ours and every entry of a name training
writes (``metrics.jsonl``, ``tensorboard/``, ``checkpoint*/``) is one that such a checkpoint's
manifest lists (see ``manifest.py``); the user's other files in it are left alone. A new or
empty folder may become a run; any other folder is the user's
and is refused, naming a file in it, so that training never overwrites a ``metrics.jsonl`` or
deletes a ``checkpoint/`` it did not write. Training claims a new run folder by writing
``checkpoint/manifest.json`` before anything else (a checkpoint folder with no weights yet,
which :func:`~multitoken.training.checkpoint.find_checkpoint` ignores).
"""
from __future__ import annotations

import os
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import nearest_existing
from multitoken.training.checkpoint import CHECKPOINT, KIND, check_replaceable
from multitoken.training.manifest import first_file, read_manifest, run_files, write_manifest
from multitoken.training.metrics import METRICS

TENSORBOARD = "tensorboard"
RUN_FILES = (METRICS, TENSORBOARD)  # what training writes in a run folder beside its checkpoints
CHECKPOINT_FOLDERS = (CHECKPOINT, CHECKPOINT + ".old", CHECKPOINT + ".tmp")


def _our_checkpoint_folders(out: Path) -> list[Path]:
    return [out / n for n in CHECKPOINT_FOLDERS if (out / n).is_dir() and read_manifest(out / n, KIND) is not None]


def _check_parent(out: Path) -> None:
    parent = nearest_existing(out.parent)
    if not parent.is_dir():
        raise MultitokenError(f"--out {out}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise MultitokenError(f"--out {out}: folder {parent} is not writable")


def check_run_dir(out: str | os.PathLike) -> Path:
    """Refuse, before any work, a run folder training could not write or could only write by
    overwriting the user's files (a one-line :class:`MultitokenError` naming the file)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MultitokenError(f"--out {out} is a file, not a folder; choose a new or empty folder")
    if not out.exists():
        _check_parent(out)
        return out
    folders = _our_checkpoint_folders(out)
    mine = {p.name for p in folders}.union(*(run_files(p, KIND) for p in folders))
    # A run of ours may hold the user's files too (left alone); what training would write must be ours.
    foreign = [p for p in sorted(out.iterdir()) if p.name not in mine
               and (not folders or p.name in RUN_FILES or p.name in CHECKPOINT_FOLDERS)]
    if foreign:
        raise MultitokenError(f"--out {out} is not empty and not a multitoken run: {first_file(foreign[0])} "
                              "was not written by multitoken; choose a new or empty folder")
    if not os.access(out, os.W_OK):
        raise MultitokenError(f"--out {out}: the folder is not writable")
    check_replaceable(out, CHECKPOINT)
    return out


def claim_run_dir(out: str | os.PathLike) -> Path:
    """Check ``out`` (:func:`check_run_dir`), create it, and record in its checkpoint folder's
    manifest that the run files beside it are ours."""
    out = check_run_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    folders = _our_checkpoint_folders(out)
    ckpt = folders[0] if folders else out / CHECKPOINT
    if not folders:
        ckpt.mkdir()
    m = read_manifest(ckpt, KIND) or {"files": []}
    if not set(RUN_FILES) <= set(m.get("run_files", [])):
        write_manifest(ckpt, KIND, m["files"], RUN_FILES)
    return out
