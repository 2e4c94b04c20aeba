"""File writes that a killed process never leaves half-done, and JSON reads with one-line errors.

Every file the project writes goes through :func:`atomic_write` (a temp file in the same
folder, flushed, then renamed over the target), so a reader sees the old file or the new one,
never a torn one. :func:`read_json` turns a missing, unreadable or malformed file into a
:class:`~multitoken.errors.MultitokenError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, TypeVar

from multitoken.errors import MultitokenError, first_line

T = TypeVar("T")


def atomic_write(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` via a temp file + fsync + rename; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; a plain open() would honour the umask
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``obj`` as JSON (one trailing newline), written atomically."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a missing, unreadable or malformed file raises MultitokenError
    ``"<what> <path> ..."`` (``what`` says what the file is, e.g. "heads config")."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MultitokenError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise MultitokenError(f"cannot read {what} {path}: {first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise MultitokenError(f"{what} {path} is not valid JSON: {e}") from None


def nearest_existing(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing ancestor (what a write that
    creates the missing folders, as :func:`atomic_write` does, needs to be a writable folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str = "output file") -> Path:
    """Refuse, before any work, an output file that could not be written later: the path is a
    folder, or the nearest existing folder above it is a file or not writable (missing folders
    are fine: :func:`atomic_write` creates them)."""
    path = Path(path)
    if path.is_dir():
        raise MultitokenError(f"{what} {path} is a folder, not a file")
    folder = nearest_existing(path.parent)
    if not folder.is_dir():
        raise MultitokenError(f"{what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK):
        raise MultitokenError(f"{what} {path}: folder {folder} is not writable")
    return path


def json_object(line: str | bytes, where: str, error: type[MultitokenError] = MultitokenError) -> dict:
    """One JSONL record: ``line`` parsed as a JSON object, else ``error("<where>: ...")``
    (``where`` names the file and line, e.g. ``"data.jsonl:3"``)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def cache_dir(name: str) -> Path:
    """``<root>/<name>``, the one place caches live: root = ``$MULTITOKEN_CACHE``, else
    ``$XDG_CACHE_HOME/multitoken``, else ``~/.cache/multitoken`` (token stores, the SmolLM2
    safetensors copy, cost calibrations, kernel choices)."""
    root = os.environ.get("MULTITOKEN_CACHE")
    if root:
        return Path(root).expanduser() / name
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "multitoken" / name


def proc_field(path: str, key: str) -> str | None:
    """The value after ``key:`` in a /proc file, or None (not Linux, or not listed)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def cache_file(folder: str, key: dict) -> Path:
    """The file :func:`cached_record` keeps ``key``'s record in: ``cache_dir(folder)/<digest of key>.json``."""
    return cache_dir(folder) / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]}.json"


def cached_record(folder: str, key: dict, measure: Callable[[], T], to_dict: Callable[[T], dict],
                  from_dict: Callable[[dict], T], what: str, progress: TextIO | None = None) -> T:
    """A measurement (``what``, e.g. "decode costs") kept on disk in :func:`cache_file`
    ``(folder, key)`` as ``{"key": key, "value": to_dict(result)}``: read back when the file
    holds this key and ``from_dict`` accepts its value, else ``measure()``-d and written. A
    missing, corrupt or foreign file is measured again, never a crash (``from_dict`` raising
    MultitokenError, KeyError, TypeError or ValueError counts as corrupt); a folder that cannot
    be written keeps the result in memory only, with one line to ``progress``."""
    path = cache_file(folder, key)
    if path.is_file():
        try:
            record = read_json(path, f"{what} cache")
            if isinstance(record, dict) and record.get("key") == key:
                return from_dict(record["value"])
        except (MultitokenError, KeyError, TypeError, ValueError):
            pass
    value = measure()
    try:
        write_json(path, {"key": key, "value": to_dict(value)})
    except OSError as e:  # a read-only home must not stop the caller: the result stays in memory
        if progress is not None:
            print(f"multitoken: cannot cache {what} in {path.parent}: {e}", file=progress)
    return value
