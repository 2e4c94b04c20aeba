"""``multitoken analyze``: model locations and bad input (issue 14, items 6 and 13)."""
import json

import pytest

from multitoken.cli.main import main
from multitoken.data.tokenizer import ByteTokenizer
from multitoken.training import save_checkpoint

from conftest import tiny_model


def one_error(capsys, *argv):
    rc = main([*map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_analyze_accepts_run_and_checkpoint_folders(tmp_path, capsys):
    model = tiny_model(vocab_size=257)
    save_checkpoint(tmp_path / "run", model, ByteTokenizer())
    for where in (tmp_path / "run", tmp_path / "run" / "checkpoint"):
        assert main(["analyze", "--model", str(where), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["config"]["vocab_size"] == 257 and data["config"]["n_future"] == 3


def test_analyze_model_errors_are_one_line(tmp_path, capsys):
    assert "does not exist" in one_error(capsys, "analyze", "--model", tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "no checkpoint in" in one_error(capsys, "analyze", "--model", tmp_path / "empty")


@pytest.mark.parametrize("flag, value", [("--seq-len", 0), ("--seq-len", -3), ("--batch-size", 0),
                                         ("--chunk-size", 0)])
def test_analyze_rejects_nonsense_sizes(tmp_path, capsys, flag, value):
    tiny_model().cfg.save(tmp_path / "cfg.json")
    line = one_error(capsys, "analyze", "--config", tmp_path / "cfg.json", flag, value)
    assert f"{flag.lstrip('-').replace('-', '_')}={value}" in line and ">= 1" in line
