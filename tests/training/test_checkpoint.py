import json
import os

import pytest
import torch
from safetensors import safe_open

import multitoken.training.checkpoint as ck
from multitoken.training.checkpoint import (
    CheckpointError, CheckpointNotFoundError, find_checkpoint, load_model, load_trainer_state,
    read_train_config, save_checkpoint,
)
from multitoken.data.tokenizer import ByteTokenizer, make_tokenizer

from conftest import HEAD_TYPES, tiny_model


def byte_model(head_type="residual", seed=0, **kw):
    return tiny_model(head_type, n_future=3, seed=seed, vocab_size=257, **kw)


def same_outputs(a, b):
    tokens = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(tokens), b(tokens), rtol=0, atol=0)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_round_trip_every_head_type(tmp_path, head_type):
    model = byte_model(head_type)
    ckpt = save_checkpoint(tmp_path / "run", model, ByteTokenizer())
    assert ckpt == tmp_path / "run" / "checkpoint"
    loaded, tok = load_model(tmp_path / "run")
    assert loaded.cfg == model.cfg and isinstance(tok, ByteTokenizer) and not loaded.training
    same_outputs(model, loaded)
    # also loadable from the checkpoint directory itself
    same_outputs(model, load_model(ckpt)[0])


def test_tied_weights_saved_once_and_retied(tmp_path):
    model = byte_model()
    assert model.lm_head.weight is model.embed.weight
    ckpt = save_checkpoint(tmp_path, model, ByteTokenizer())
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        tied = json.loads(f.metadata()["multitoken.tied"])
    assert "embed.weight" in keys and "lm_head.weight" not in keys
    assert tied == {"lm_head.weight": "embed.weight"}
    loaded, _ = load_model(tmp_path)
    assert loaded.lm_head.weight is loaded.embed.weight
    # untied model: both saved
    untied = byte_model(tie_embeddings=False)
    save_checkpoint(tmp_path / "u", untied, ByteTokenizer())
    loaded, _ = load_model(tmp_path / "u")
    assert loaded.lm_head.weight is not loaded.embed.weight
    same_outputs(untied, loaded)


def test_bpe_tokenizer_saved_with_model(tmp_path):
    tok = make_tokenizer("bpe", ["def f(x): return x + 1\n"] * 50, vocab_size=270)
    model = tiny_model(vocab_size=tok.vocab_size)
    save_checkpoint(tmp_path, model, tok)
    _, loaded = load_model(tmp_path)
    assert loaded.vocab_size == tok.vocab_size and loaded.encode("def f") == tok.encode("def f")


def test_trainer_state_is_weights_only_loadable(tmp_path):
    model = byte_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    model(torch.randint(0, 257, (1, 8))).sum().backward()
    opt.step()
    state = {"step": 7, "tokens_seen": 56, "optimizer": opt.state_dict(), "rng": {"torch": torch.get_rng_state()}}
    ckpt = save_checkpoint(tmp_path, model, ByteTokenizer(), train_config={"lr": 1e-3}, trainer_state=state)
    raw = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert raw["step"] == 7 and raw["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert load_trainer_state(ckpt)["tokens_seen"] == 56
    assert read_train_config(ckpt) == {"lr": 1e-3}


def test_crash_between_renames_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first, second = byte_model(seed=0), byte_model(seed=1)
    save_checkpoint(run, first, ByteTokenizer(), trainer_state={"step": 1})
    real_rename = os.rename

    def rename(src, dst):
        if str(src).endswith(".tmp"):  # the final step: publish the new checkpoint
            raise OSError("simulated SIGKILL")
        return real_rename(src, dst)

    monkeypatch.setattr(ck.os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(run, second, ByteTokenizer(), trainer_state={"step": 2})
    monkeypatch.undo()
    # `checkpoint/` was moved aside to `checkpoint.old/`: still found, still the first one
    assert not (run / "checkpoint").exists() and (run / "checkpoint.old").is_dir()
    assert find_checkpoint(run) == run / "checkpoint.old"
    assert load_trainer_state(find_checkpoint(run))["step"] == 1
    same_outputs(first, load_model(run)[0])
    # the next save recovers: new checkpoint in place, leftovers removed
    save_checkpoint(run, second, ByteTokenizer(), trainer_state={"step": 3})
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    same_outputs(second, load_model(run)[0])


def test_crash_while_writing_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    first = byte_model(seed=0)
    save_checkpoint(run, first, ByteTokenizer(), trainer_state={"step": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt  # e.g. a second Ctrl-C in the middle of torch.save

    monkeypatch.setattr(ck.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(run, byte_model(seed=1), ByteTokenizer(), trainer_state={"step": 2})
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    same_outputs(first, load_model(run)[0])
    # a stale temp dir (SIGKILL mid-write) is never trusted and is replaced by the next save
    (run / "checkpoint.tmp").mkdir()
    (run / "checkpoint.tmp" / "model.safetensors").write_bytes(b"partial")
    assert find_checkpoint(run) == run / "checkpoint"


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
        load_model(tmp_path / "empty")
    ckpt = save_checkpoint(tmp_path / "run", byte_model(), ByteTokenizer(), trainer_state={"step": 1})
    with pytest.raises(CheckpointNotFoundError, match="train_config.json missing"):
        read_train_config(ckpt)

    weights = ckpt / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt weights file") as e:
        load_model(ckpt)
    assert "\n" not in str(e.value)
    weights.write_bytes(good)

    (ckpt / "trainer_state.pt").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointError, match="corrupt .*trainer_state.pt"):
        load_trainer_state(ckpt)

    (ckpt / "tokenizer_config.json").unlink()
    with pytest.raises(CheckpointNotFoundError, match="tokenizer missing"):
        load_model(ckpt)


def test_vocab_and_shape_mismatches(tmp_path):
    ckpt = save_checkpoint(tmp_path, byte_model(), ByteTokenizer())
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "vocab_size": 300}))
    with pytest.raises(CheckpointError, match="vocab mismatch.*vocab_size=300.*257"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "d_model": 64}))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "head_type": "linear", "share_embeddings": False}))
    with pytest.raises(CheckpointError, match="do not match the model config"):
        load_model(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "n_future": 0}))
    with pytest.raises(CheckpointError, match="bad config.json.*n_future"):
        load_model(ckpt)
    with pytest.raises(CheckpointError, match="vocab mismatch"):
        save_checkpoint(tmp_path / "x", tiny_model(vocab_size=48), ByteTokenizer())


# --------------------------------------------------------------------------- issue 14: only our files are replaced


def test_user_files_in_a_checkpoint_survive_every_save(tmp_path):
    run = tmp_path / "run"
    save_checkpoint(run, byte_model(seed=0), ByteTokenizer(), trainer_state={"step": 1})
    (run / "checkpoint" / "notes.txt").write_bytes(b"mine\x00\xff")
    (run / "checkpoint" / "tree.json").write_text('{"paths": [[0]]}')
    for step in (2, 3):
        save_checkpoint(run, byte_model(seed=step), ByteTokenizer(), trainer_state={"step": step})
        assert (run / "checkpoint" / "notes.txt").read_bytes() == b"mine\x00\xff"
        assert (run / "checkpoint" / "tree.json").read_text() == '{"paths": [[0]]}'
        assert ck.kept_files(run / "checkpoint") == ["notes.txt", "tree.json"]
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    assert load_trainer_state(find_checkpoint(run))["step"] == 3


def test_damaged_checkpoint_keeps_what_is_not_ours(tmp_path):
    run = tmp_path / "run"
    ckpt = save_checkpoint(run, byte_model(), ByteTokenizer(), trainer_state={"step": 1})
    (ckpt / "model.safetensors").unlink()  # damaged: no weights
    (ckpt / "notes.txt").write_text("mine")
    save_checkpoint(run, byte_model(seed=1), ByteTokenizer(), trainer_state={"step": 2})
    assert (ckpt / "notes.txt").read_text() == "mine" and load_trainer_state(ckpt)["step"] == 2
    # a folder of the user's in checkpoint/ (no manifest): kept, never wiped
    other = tmp_path / "other"
    (other / "checkpoint").mkdir(parents=True)
    (other / "checkpoint" / "notes.txt").write_text("mine")
    save_checkpoint(other, byte_model(), ByteTokenizer(), trainer_state={"step": 1})
    assert (other / "checkpoint" / "notes.txt").read_text() == "mine"


def test_a_file_of_ours_by_name_but_not_by_manifest_is_never_overwritten(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "config.json").write_text('{"mine": true}')
    with pytest.raises(CheckpointError, match=r"config.json was not written by multitoken") as e:
        save_checkpoint(run, byte_model(), ByteTokenizer())
    assert "\n" not in str(e.value)
    assert (run / "checkpoint" / "config.json").read_text() == '{"mine": true}'
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint"]
    # a stale checkpoint.tmp/ holding a file we did not write is refused, not wiped
    run2 = tmp_path / "run2"
    (run2 / "checkpoint.tmp").mkdir(parents=True)
    (run2 / "checkpoint.tmp" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt was not written by multitoken"):
        save_checkpoint(run2, byte_model(), ByteTokenizer())
    assert (run2 / "checkpoint.tmp" / "notes.txt").read_text() == "mine"


def test_garbage_trainer_state_never_suggests_unsafe_loading(tmp_path):
    import datetime

    ckpt = save_checkpoint(tmp_path / "run", byte_model(), ByteTokenizer(), trainer_state={"step": 1})
    for payload in (lambda f: f.write_bytes(b"not a pickle"),
                    lambda f: torch.save({"step": 1, "when": datetime.date(2020, 1, 1)}, f)):
        payload(ckpt / "trainer_state.pt")
        with pytest.raises(CheckpointError, match="corrupt or not written by multitoken") as e:
            load_trainer_state(ckpt)
        assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
