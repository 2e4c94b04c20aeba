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
