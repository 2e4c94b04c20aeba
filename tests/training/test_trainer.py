import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from multitoken.data import DataError
from multitoken.model.targets import shift_targets
from multitoken.training import (
    MTPTrainer, TrainConfig, TrainingDiverged, build_config, find_checkpoint, load_model, merge_config, parse_set,
    train_demo_model,
)
from multitoken.training.checkpoint import load_trainer_state
from multitoken.training.config import PRESETS, load_config_file
from conftest import write_corpus

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("token_cache")


def tiny(corpus, **over) -> TrainConfig:
    return build_config("tiny", overrides=merge_config({"data": [str(corpus)], "val_fraction": 0.2,
                                                        "tensorboard": False}, over))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("field, value, allowed", [
    ("lr", -1.0, "> 0"),
    ("weighting", "meta", "tutorial, uniform, deepseek"),
    ("device", "tpu", "auto, cpu"),
    ("dtype", "fp8", "auto, float32, bfloat16"),
    ("tokenizer", "wordpiece", "byte, bpe"),
    ("micro_batch_size", 0, ">= 1"),
    ("betas", [0.9], "two numbers"),
    ("val_fraction", 1.0, "[0, 1)"),
    ("compile", "yes", "true or false"),
    ("ce_chunk", 0, ">= 1"),
])
def test_config_validation_names_field_and_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=f"{field}=") as e:
        TrainConfig(**{field: value})
    assert allowed in str(e.value) and "\n" not in str(e.value)


def test_config_validation_cross_field():
    with pytest.raises(ValueError, match="exactly one of max_steps / max_tokens"):
        TrainConfig(max_steps=None)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="n_future"):
        TrainConfig(model={"n_future": 0})
    with pytest.raises(ValueError, match="model.max_seq_len"):
        TrainConfig(seq_len=128, model={"max_seq_len": 64})
    with pytest.raises(ValueError, match="unknown config key 'model.widht'"):
        TrainConfig(model={"widht": 3})
    with pytest.raises(ValueError, match="vocab_size"):
        TrainConfig(model={"vocab_size": 300}).model_config(257)
    assert TrainConfig().model_config(257).max_seq_len == 256  # defaults to seq_len
    assert TrainConfig(lr=2e-3).final_lr == pytest.approx(2e-4)
    assert TrainConfig(max_steps=None, max_tokens=10_000, micro_batch_size=2, seq_len=100).total_steps() == 50


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_unknown_key_in_file_is_one_line(tmp_path, suffix):
    f = tmp_path / f"cfg{suffix}"
    f.write_text('{"lr": 0.001, "learning_rate": 0.1}')
    with pytest.raises(ValueError) as e:
        build_config("tiny", f)
    msg = str(e.value)
    assert "unknown config key 'learning_rate'" in msg and str(f) in msg and "\n" not in msg
    f.write_text('{"model": {"d_modle": 32}}')
    with pytest.raises(ValueError, match="unknown config key 'model.d_modle'"):
        build_config("tiny", f)


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config_file(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping"):
        load_config_file(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        build_config("huge")


def test_precedence_preset_file_flags(tmp_path):
    f = tmp_path / "cfg.yaml"
    f.write_text("lr: 0.005\nseq_len: 32\nmodel:\n  d_model: 32\n  head_type: linear\n")
    over = merge_config(parse_set(["seq_len=48", "model.n_future=2", "betas=[0.8, 0.9]"]), {"lr": 0.007})
    cfg = build_config("tiny", f, over)
    assert cfg.lr == 0.007 and cfg.seq_len == 48 and cfg.betas == (0.8, 0.9)
    # model fields merge field by field across layers
    assert cfg.model == {**PRESETS["tiny"]["model"], "d_model": 32, "head_type": "linear", "n_future": 2}
    assert cfg.warmup_steps == PRESETS["tiny"]["warmup_steps"]
    with pytest.raises(ValueError, match="key=value"):
        parse_set(["lr"])
    with pytest.raises(ValueError, match="only model"):
        parse_set(["optim.lr=1"])
    # round trip through the serialised form
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_presets_and_example_file_are_valid():
    for name in PRESETS:
        cfg = build_config(name)
        cfg.model_config(257)
    small = build_config("small").model_config(257)
    assert (small.n_future, small.head_type, small.vocab_size) == (4, "sequential", 257)
    for f in sorted((ROOT / "configs").glob("*.yaml")):
        build_config(None, f)


# --------------------------------------------------------------------------- training


def test_prepare_multi_targets_uses_shift_targets(corpus):
    tr = MTPTrainer.from_config(tiny(corpus), "unused", progress=False)
    tokens, doc_ids = tr.batch_for_step(0)[0]
    targets = tr.prepare_multi_targets(tokens, doc_ids)
    assert len(targets) == 4
    for i, t in enumerate(targets):
        assert torch.equal(t, shift_targets(tokens, i, -100, doc_ids))
    assert not Path("unused").exists()


def test_training_lowers_loss_and_writes_metrics(corpus, tmp_path):
    tr = MTPTrainer.from_config(tiny(corpus), tmp_path / "run", progress=False)
    result = tr.fit()
    assert result["status"] == "finished" and result["step"] == 20
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    val_rows = [r for r in rows if r.get("split") == "val"]
    assert [r["step"] for r in train_rows] == list(range(1, 21))
    assert [r["step"] for r in val_rows] == [10, 20]
    for r in train_rows:
        assert {"step", "tokens", "lr", "loss", "primary", "auxiliary", "head_losses", "head_accuracy",
                "tokens_per_s"} <= set(r)
        assert len(r["head_losses"]) == len(r["head_accuracy"]) == 4
        assert r["tokens"] == r["step"] * 4 * 64
        # deepseek weighting (the default): loss = CE_0 + 0.3 * mean_{i>=1} CE_i
        h = r["head_losses"]
        assert r["loss"] == pytest.approx(h[0] + 0.3 * sum(h[1:]) / 3, rel=1e-5)
    assert train_rows[-1]["loss"] < 0.7 * train_rows[0]["loss"]
    assert val_rows[-1]["loss"] < val_rows[0]["loss"]
    v = val_rows[-1]
    assert v["perplexity"] == pytest.approx(math.exp(v["head_losses"][0]), rel=1e-5)
    assert all(0 <= a <= 1 for a in v["head_accuracy"]) and v["val_tokens"] > 0
    # lr followed warmup then decay
    assert train_rows[0]["lr"] == pytest.approx(3e-3 / 2) and train_rows[-1]["lr"] < train_rows[5]["lr"]
    model, tok = load_model(tmp_path / "run")
    assert model.cfg.vocab_size == tok.vocab_size == 257
    assert json.loads((tmp_path / "run" / "checkpoint" / "eval.json").read_text())["step"] == 20


def test_memory_efficient_and_naive_steps_agree(corpus):
    results = []
    for efficient in (True, False):
        tr = MTPTrainer.from_config(tiny(corpus, memory_efficient=efficient), "unused", progress=False)
        m = tr.train_step(tr.batch_for_step(0))
        results.append((m, [p.detach().clone() for p in tr.model.parameters()]))
    (m1, p1), (m2, p2) = results
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-5)
    # Adam's first step moves every weight by ~lr (1.5e-3) whatever its gradient's size, so
    # float rounding in near-zero gradients shows up at ~1e-6: compare at 1% of a step.
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, atol=1.5e-5, rtol=0)


def test_grad_accum_matches_one_big_batch(corpus):
    params, grads = [], []
    for accum in (1, 2):
        tr = MTPTrainer.from_config(tiny(corpus), "unused", progress=False)
        step_grads = []  # the accumulated gradients the optimizer sees
        tr.optimizer.register_step_pre_hook(
            lambda opt, args, kwargs: step_grads.extend(p.grad.clone() for p in tr.model.parameters()))
        tokens = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
        batch = [(tokens, None)] if accum == 1 else [(tokens[:2], None), (tokens[2:], None)]
        tr.train_step(batch)
        params.append([p.detach().clone() for p in tr.model.parameters()])
        grads.append(step_grads)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    # Adam's first step moves every weight by ~lr whatever its gradient's size, so float
    # rounding in near-zero gradients shows up at ~1e-6 in the weights: compare at 1% of a step.
    for a, b in zip(*params):
        torch.testing.assert_close(a, b, atol=1.5e-5, rtol=0)


def _train_rows(run: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "tokens", "lr", "loss", "head_losses", "head_accuracy")}
            for r in rows if "split" not in r]


def test_resume_is_exact(corpus, tmp_path):
    cfg = tiny(corpus, max_steps=8, checkpoint_every=0, eval_every=0, grad_accum=2)
    MTPTrainer.from_config(cfg, tmp_path / "full", progress=False).fit()
    half = MTPTrainer.from_config(cfg, tmp_path / "half", progress=False).fit(stop_at=4)
    assert half["status"] == "stopped" and load_trainer_state(half["checkpoint"])["step"] == 4
    # A killed run may have logged past its checkpoint: those rows are dropped on resume.
    with open(tmp_path / "half" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 5, "loss": 123.0, "tokens": 0, "lr": 0, "head_losses": [],
                            "head_accuracy": []}) + "\n")
    resumed = MTPTrainer.from_config(cfg, tmp_path / "half", resume=True, progress=False)
    assert resumed.step == 4 and resumed.tokens_seen == 4 * 2 * 4 * 64
    resumed.fit()
    assert _train_rows(tmp_path / "half") == _train_rows(tmp_path / "full")
    a, _ = load_model(tmp_path / "full")
    b, _ = load_model(tmp_path / "half")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    sa = load_trainer_state(find_checkpoint(tmp_path / "full"))
    sb = load_trainer_state(find_checkpoint(tmp_path / "half"))
    for k, v in sa["optimizer"]["state"].items():
        assert torch.equal(v["exp_avg_sq"], sb["optimizer"]["state"][k]["exp_avg_sq"])


def test_resume_errors(corpus, tmp_path):
    from multitoken.training.checkpoint import CheckpointError, CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="nothing to resume"):
        MTPTrainer.from_config(tiny(corpus), tmp_path / "empty", resume=True, progress=False)
    run = tmp_path / "run"
    MTPTrainer.from_config(tiny(corpus, max_steps=2), run, progress=False).fit()
    before = (run / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        MTPTrainer.from_config(tiny(corpus, max_steps=2), run, progress=False)
    with pytest.raises(CheckpointError, match="head_type: checkpoint 'residual', config 'linear'"):
        MTPTrainer.from_config(tiny(corpus, model={"head_type": "linear"}), run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="n_future"):
        MTPTrainer.from_config(tiny(corpus, model={"n_future": 2}), run, resume=True, progress=False)
    with pytest.raises(CheckpointError, match="'byte' tokenizer"):
        MTPTrainer.from_config(tiny(corpus, tokenizer="bpe"), run, resume=True, progress=False)
    assert (run / "checkpoint" / "model.safetensors").read_bytes() == before


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    tr = MTPTrainer.from_config(tiny(corpus, checkpoint_every=4), tmp_path / "run", progress=False)
    real = tr._backward

    def poisoned(model, loss_fn, tokens, doc_ids=None, scale=1.0):
        out = real(model, loss_fn, tokens, doc_ids, scale)
        if tr.step >= 6:
            out["loss"] = out["loss"] * float("nan")
        return out

    tr._backward = poisoned
    with pytest.raises(TrainingDiverged, match=r"loss is nan at step 7.*last good checkpoint.*checkpoint"):
        tr.fit()
    assert tr.step == 6
    state = load_trainer_state(find_checkpoint(tmp_path / "run"))
    assert state["step"] == 4
    model, _ = load_model(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_sigint_checkpoints_and_stops(corpus, tmp_path):
    tr = MTPTrainer.from_config(tiny(corpus, checkpoint_every=0), tmp_path / "run", progress=False)
    real = tr.train_step

    def step_then_signal(batch):
        out = real(batch)
        if tr.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: no KeyboardInterrupt
        return out

    tr.train_step = step_then_signal
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup / some CI runners
    result = tr.fit()
    assert result["status"] == "interrupted" and result["step"] == 3 and result["signal"] == signal.SIGINT
    assert load_trainer_state(result["checkpoint"])["step"] == 3
    assert signal.getsignal(signal.SIGINT) is before  # restored


def test_bpe_tokenizer_run_saves_and_reloads_tokenizer(corpus, tmp_path):
    cfg = tiny(corpus, tokenizer="bpe", bpe_vocab_size=300, max_steps=2)
    result = MTPTrainer.from_config(cfg, tmp_path / "run", progress=False).fit()
    assert (result["checkpoint"] / "tokenizer.json").is_file()
    model, tok = load_model(tmp_path / "run")
    assert type(tok).__name__ == "BPETokenizer" and model.cfg.vocab_size == tok.vocab_size <= 300
    text = "def f(x):\n    return x"
    assert tok.decode(tok.encode(text)) == text
    resumed = MTPTrainer.from_config(cfg.replace(max_steps=3), tmp_path / "run", resume=True, progress=False)
    assert resumed.fit()["step"] == 3


def test_bad_data_inputs(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        MTPTrainer.from_config(build_config("tiny", overrides={"data": [str(tmp_path / "empty")]}),
                               tmp_path / "run", progress=False)
    with pytest.raises(DataError, match="not found"):
        MTPTrainer.from_config(build_config("tiny", overrides={"data": [str(tmp_path / "missing")]}),
                               tmp_path / "run", progress=False)
    small = write_corpus(tmp_path / "small", n_files=3)
    with pytest.raises(DataError, match="fewer than one batch|split is empty|validation split"):
        MTPTrainer.from_config(build_config("tiny", overrides={"data": [str(small)], "seq_len": 4096,
                                                               "model": {"max_seq_len": 4096}}),
                               tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_train_demo_model_reuses_finished_checkpoint(corpus, tmp_path, monkeypatch):
    over = {**PRESETS["tiny"], "data": [str(corpus)], "val_fraction": 0.2, "tensorboard": False}
    ckpt = train_demo_model(tmp_path / "demo", steps=3, device="cpu", progress=False, overrides=over)
    assert ckpt == tmp_path / "demo" / "model" / "checkpoint"
    assert load_trainer_state(ckpt)["step"] == 3
    monkeypatch.setattr(MTPTrainer, "fit", lambda self, *a, **k: pytest.fail("retrained"))
    assert train_demo_model(tmp_path / "demo", progress=False) == ckpt


# --------------------------------------------------------------------------- issue 14: heads without targets


@pytest.mark.parametrize("seq_len, n_future", [(1, 1), (2, 2), (3, 4), (4, 4)])
def test_seq_len_must_give_every_head_a_target(seq_len, n_future):
    with pytest.raises(ValueError, match=f"seq_len={seq_len}") as e:
        TrainConfig(seq_len=seq_len, model={"n_future": n_future})
    assert f">= {n_future + 1}" in str(e.value) and f"n_future={n_future}" in str(e.value)
    TrainConfig(seq_len=n_future + 1, model={"n_future": n_future})


def test_heads_without_targets_are_none_not_zero(corpus, tmp_path, monkeypatch):
    import multitoken.training.trainer as train_mod

    tr = MTPTrainer.from_config(tiny(corpus), tmp_path / "run", progress=False)
    tokens = torch.randint(0, 257, (2, 3))  # T=3: heads 2 and 3 (t+3, t+4) have no target
    m = tr.train_step((tokens, torch.zeros_like(tokens)))
    assert m["head_losses"][2:] == [None, None] and m["head_accuracy"][2:] == [None, None]
    assert all(isinstance(v, float) for v in m["head_losses"][:2] + m["head_accuracy"][:2])
    # validation with no target at all: every head and the perplexity are "no targets", not 0 / 1.0
    zeros = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long)
    monkeypatch.setattr(train_mod, "validation_sums", lambda *a, **k: zeros)
    ev = tr.evaluate()
    assert ev["head_losses"] == [None] * 4 and ev["head_accuracy"] == [None] * 4
    assert ev["perplexity"] is None and ev["primary"] is None and ev["val_tokens"] == 0
    json.dumps(ev)  # None is JSON null
