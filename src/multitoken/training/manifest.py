"""What in a folder the project wrote: ``manifest.json``, and the rules for never touching the rest.

Every checkpoint folder that training writes holds a small ``manifest.json``::

    {"written_by": "multitoken", "kind": "checkpoint", "files": [...], "run_files": [...]}

``files`` are the entries the project wrote in that folder (it may replace or delete them);
``run_files`` the entries it writes beside it, in the run folder (``metrics.jsonl``,
``tensorboard/``). Everything else belongs to the user (a ``notes.txt``, the ``tree.json`` that
``tune-tree`` saves): it is never deleted or overwritten, only moved (one atomic rename per
entry) into the checkpoint that replaces its folder. A folder without a valid manifest holds
nothing of ours. (The run folder has no manifest of its own: its listing stays what it was.)
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from multitoken.errors import MultitokenError
from multitoken.io import read_json, write_json

MANIFEST = "manifest.json"
WRITTEN_BY = "multitoken"


def write_manifest(folder: Path, kind: str, files, run_files=()) -> None:
    """Record (atomically) that the entries ``files`` of ``folder`` (and ``run_files`` of its
    parent, the run folder) are ours."""
    write_json(Path(folder) / MANIFEST, {"written_by": WRITTEN_BY, "kind": kind,
                                         "files": sorted(set(files) - {MANIFEST}),
                                         "run_files": sorted(set(run_files))})


def read_manifest(folder: Path, kind: str) -> dict | None:
    """The folder's manifest of ``kind``, or None when it has none (or not one of ours)."""
    try:
        data = read_json(Path(folder) / MANIFEST, "manifest")
    except MultitokenError:
        return None
    if not (isinstance(data, dict) and data.get("written_by") == WRITTEN_BY and data.get("kind") == kind
            and isinstance(data.get("files"), list) and isinstance(data.get("run_files", []), list)):
        return None
    return data


def ours(folder: Path, kind: str) -> set[str]:
    """Names of the entries in ``folder`` that the project wrote (the manifest included)."""
    m = read_manifest(folder, kind)
    return set() if m is None else {*map(str, m["files"]), MANIFEST}


def run_files(folder: Path, kind: str) -> set[str]:
    """Names of the entries beside ``folder`` (in its run folder) that the project wrote."""
    m = read_manifest(folder, kind)
    return set() if m is None else set(map(str, m.get("run_files", [])))


def foreign_entries(folder: Path, kind: str) -> list[Path]:
    """Entries of ``folder`` the project did not write, sorted by name ([] when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    mine = ours(folder, kind)
    return sorted((p for p in folder.iterdir() if p.name not in mine), key=lambda p: p.name)


def first_file(entry: Path) -> Path:
    """``entry`` itself, or for a folder the first file inside it (what an error names)."""
    if entry.is_dir() and not entry.is_symlink():
        files = sorted(p for p in entry.rglob("*") if not p.is_dir())
        if files:
            return files[0]
    return entry


def not_ours_error(entry: Path, hint: str) -> MultitokenError:
    return MultitokenError(f"{first_file(entry)} was not written by multitoken; {hint}")


def move_entries(src: Path, dst: Path, kind: str) -> None:
    """Move the user's entries of ``src`` into ``dst`` (each one atomic rename: at every instant
    an entry is in one of the two folders). Never replaces an entry of ``dst``."""
    for p in foreign_entries(src, kind):
        target = Path(dst) / p.name
        if target.exists() or target.is_symlink():
            raise MultitokenError(f"{p} was not written by multitoken and {target} exists too; move one away")
        os.rename(p, target)


def remove_ours(folder: Path, kind: str) -> bool:
    """Delete from ``folder`` what the project wrote there, and the folder when that empties it.
    Returns True when the folder is gone; the user's entries always stay."""
    folder = Path(folder)
    if not folder.exists():
        return True
    for name in ours(folder, kind):
        p = folder / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
    try:
        os.rmdir(folder)
    except OSError:  # not empty: what is left is the user's
        return False
    return True
