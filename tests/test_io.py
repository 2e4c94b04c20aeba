"""multitoken.io: atomic writes keep the usual file mode, JSON reads fail with one line naming the file."""
import os

import pytest

from multitoken.errors import MultitokenError
from multitoken.io import atomic_write, cache_dir, json_object, read_json, write_json


def test_atomic_write_replaces_whole_files_with_the_umask_mode(tmp_path):
    path = tmp_path / "sub" / "f.json"
    write_json(path, {"a": 1})
    atomic_write(path, "new")
    assert path.read_text() == "new" and list(path.parent.iterdir()) == [path]  # no temp file left
    old = os.umask(0o022)
    try:
        atomic_write(path, b"x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_read_json_and_json_object_errors_name_the_file(tmp_path):
    with pytest.raises(MultitokenError, match="heads config not found"):
        read_json(tmp_path / "missing.json", "heads config")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MultitokenError, match="bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    assert json_object('{"a": 2}', "x:1") == {"a": 2}
    with pytest.raises(MultitokenError, match="x:3: expected a JSON object, got list"):
        json_object("[1]", "x:3")


def test_cache_dir_root(monkeypatch, tmp_path):
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path))
    assert cache_dir("costs") == tmp_path / "costs"
    monkeypatch.delenv("MULTITOKEN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir("tokens") == tmp_path / "xdg" / "multitoken" / "tokens"
