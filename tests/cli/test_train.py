import json
import os
import signal
import subprocess
import sys
import time

import pytest

import multitoken.cli.main as cli
from multitoken.training.checkpoint import find_checkpoint, load_trainer_state
from conftest import write_corpus

FAST = ["--preset", "tiny", "--no-progress", "--set", "val_fraction=0.2", "--set", "tensorboard=false"]


pytestmark = pytest.mark.usefixtures("token_cache")


def run_cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "multitoken", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_train_cli_end_to_end(corpus, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("lr: 0.002\nmodel:\n  d_model: 32\n")
    out = tmp_path / "run"
    rc = cli.main(["train", *FAST, "--config", str(cfg), "--data", str(corpus), "--out", str(out),
                   "--steps", "6", "--n-future", "3", "--head-type", "sequential", "--lr", "0.004",
                   "--batch-size", "2", "--seq-len", "32", "--seed", "3", "--device", "cpu",
                   "--dtype", "float32", "--set", "eval_every=3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "t+3" in captured.out and "perplexity" in captured.out
    saved = json.loads((out / "checkpoint" / "train_config.json").read_text())
    # preset < file < flags
    assert saved["lr"] == 0.004 and saved["model"]["d_model"] == 32 and saved["model"]["n_future"] == 3
    assert saved["micro_batch_size"] == 2 and saved["seq_len"] == 32 and saved["seed"] == 3
    assert saved["max_steps"] == 6 and saved["eval_every"] == 3
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("split") == "val"] == [3, 6]
    # --resume with more steps continues the run with its own config
    rc = cli.main(["train", "--out", str(out), "--resume", "--steps", "8", "--no-progress"])
    assert rc == 0 and load_trainer_state(find_checkpoint(out))["step"] == 8


def test_train_cli_one_line_errors(corpus, tmp_path, capsys):
    def err(*argv):
        rc = cli.main(["train", *FAST, *map(str, argv)])
        e = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and e and e[-1].startswith("error: "), e
        return e[-1]

    assert "unknown config key 'bogus'" in err("--set", "bogus=1", "--data", corpus, "--out", tmp_path / "a")
    assert "head_type='nope'" in err("--head-type", "nope", "--data", corpus, "--out", tmp_path / "a")
    assert "n_future=0" in err("--n-future", "0", "--data", corpus, "--out", tmp_path / "a")
    assert "not found" in err("--data", tmp_path / "missing", "--out", tmp_path / "a")
    assert "config file not found" in err("--config", tmp_path / "nope.yaml", "--out", tmp_path / "a")
    assert "nothing to resume" in err("--resume", "--out", tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_train_cli_nan_exit_2_keeps_checkpoint(corpus, tmp_path, capsys, monkeypatch):
    import multitoken.training.trainer as train_mod

    real = train_mod.mtp_backward
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] > 5:
            out["loss"] = out["loss"] + float("inf")
        return out

    monkeypatch.setattr(train_mod, "mtp_backward", poisoned)
    out = tmp_path / "run"
    rc = cli.main(["train", *FAST, "--data", str(corpus), "--out", str(out), "--set", "checkpoint_every=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: loss is inf at step 6") and "last good checkpoint" in err[-1]
    assert load_trainer_state(find_checkpoint(out))["step"] == 5


def test_non_utf8_corpus_warns_once(tmp_path, capsys):
    data = write_corpus(tmp_path / "data", n_files=40)
    (data / "latin1.py").write_bytes("caf\xe9 = 'na\xefve'\n".encode("latin-1") * 40)
    rc = cli.main(["train", *FAST, "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"])
    err = capsys.readouterr().err
    warnings = [l for l in err.splitlines() if l.startswith("warning:")]
    assert rc == 0 and len(warnings) >= 1
    assert "not valid UTF-8" in warnings[0] and "replaced" in warnings[0]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--config", "--preset", "--out", "--resume", "--data", "--tokenizer", "--vocab-size",
                 "--n-future", "--head-type", "--steps", "--batch-size", "--seq-len", "--lr", "--device",
                 "--compile", "--dtype", "--seed", "--set"):
        assert flag in text
    parser = cli.build_parser()
    train = parser._subparsers._group_actions[0].choices["train"]
    assert all(a.help for a in train._actions)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--out" in capsys.readouterr().out


# --------------------------------------------------------------------------- subprocess


def test_subprocess_bad_input_is_one_line_exit_2(tmp_path):
    p = run_cli("train", "--preset", "tiny", "--set", "nosuchkey=1", "--out", tmp_path / "run")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and p.stderr.startswith("error: unknown config key")
    p = run_cli("train", "--resume", "--out", tmp_path / "run")
    assert p.returncode == 2 and p.stderr.strip() == f"error: nothing to resume: no checkpoint in {tmp_path / 'run'}"


def test_subprocess_sigint_saves_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "multitoken", "train", *FAST, "--data", str(corpus),
                             "--out", str(out), "--steps", "100000", "--set", "checkpoint_every=0",
                             "--set", "eval_every=0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted at step" in err and "--resume" in err
    step = load_trainer_state(find_checkpoint(out))["step"]
    assert step >= 1
    # the interrupted run resumes from that step
    tr_rows = [json.loads(l) for l in metrics.read_text().splitlines()]
    assert max(r["step"] for r in tr_rows) == step


# --------------------------------------------------------------------------- issue 14: run folders and bad input


def one_error(capsys, *argv):
    """Run the CLI; expect exit 2 and exactly one `error:` line (no traceback); return that line."""
    rc = cli.main([*map(str, argv)])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if l.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and not any("Traceback" in l for l in err), err
    return errors[0]


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_foreign_run_folder_is_refused_and_untouched(corpus, tmp_path, capsys):
    ud = tmp_path / "ud"
    (ud / "checkpoint").mkdir(parents=True)
    (ud / "checkpoint" / "notes.txt").write_text("my notes\n")
    (ud / "metrics.jsonl").write_text('{"mine": 1}\n')
    before = snapshot(ud)
    line = one_error(capsys, "train", *FAST, "--data", corpus, "--out", ud, "--steps", "2")
    assert "not a multitoken run" in line and "notes.txt" in line
    assert snapshot(ud) == before
    # a non-empty folder of the user's, without checkpoint/: refused too, naming the file
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("x")
    assert "thesis.tex" in one_error(capsys, "train", *FAST, "--data", corpus, "--out", tmp_path / "mine")
    assert snapshot(tmp_path / "mine") == {"thesis.tex": b"x"}


def test_user_files_in_our_run_survive(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--data", str(corpus), "--out", str(out), "--steps", "2"]) == 0
    (out / "checkpoint" / "notes.txt").write_text("my notes\n")
    (out / "README.txt").write_text("about this run\n")
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert (out / "checkpoint" / "notes.txt").read_text() == "my notes\n"
    assert (out / "README.txt").read_text() == "about this run\n"
    assert "notes.txt" in capsys.readouterr().out
    assert load_trainer_state(find_checkpoint(out))["step"] == 3


def test_resume_keeps_the_tuned_tree(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", *FAST, "--data", str(corpus), "--out", str(out), "--steps", "2",
                     "--device", "cpu"]) == 0
    assert cli.main(["tune-tree", "--model", str(out), "--budget", "4", "--prompts", "2", "--prompt-tokens", "16",
                     "--max-new-tokens", "8"]) == 0
    tree = out / "checkpoint" / "tree.json"
    saved = tree.read_bytes()
    capsys.readouterr()
    assert cli.main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert tree.read_bytes() == saved
    said = [l for l in capsys.readouterr().out.splitlines() if "tree.json" in l]
    assert len(said) == 1 and "kept" in said[0], said


def test_out_is_a_file_fails_before_any_work(corpus, tmp_path, capsys, monkeypatch):
    import multitoken.training.trainer as train_mod

    monkeypatch.setattr(train_mod, "build_datasets", lambda *a, **k: pytest.fail("loaded the data first"))
    f = tmp_path / "file.txt"
    f.write_text("keep me")
    line = one_error(capsys, "train", *FAST, "--data", corpus, "--out", f)
    assert "file.txt" in line and "not a folder" in line
    assert f.read_text() == "keep me"


@pytest.mark.parametrize("seq_len", [1, 3, 4])
def test_seq_len_must_leave_every_head_a_target(corpus, tmp_path, capsys, seq_len):
    line = one_error(capsys, "train", *FAST, "--data", corpus, "--out", tmp_path / "r", "--seq-len", seq_len)
    assert f"seq_len={seq_len}" in line and "n_future=4" in line and ">= 5" in line
    assert not (tmp_path / "r").exists()
