"""Multi-process training: DDP and FSDP2 on 2 CPU ranks (gloo, loopback) against one process.

The 2-rank runs go through the real launch path, ``multitoken train --nproc 2`` (torchrun's
elastic launcher), and are compared with a single-process run over the same global batch:
2 ranks x micro-batch 4 against one process with micro-batch 4 x grad_accum 2 (``data.batch_indices``
gives rank r of step s the same sequences as micro-batch r of that step, and both average the two
micro-batch means, so the two runs compute the same gradients up to float32 summation order).

Tolerances (float32, measured differences are ~1e-6): training loss per step within 1e-5, final
weights within 1e-4 absolute after 4-5 AdamW steps.

Skip the whole file with MULTITOKEN_SKIP_DISTRIBUTED=1 (it is skipped without gloo anyway).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from multitoken.training import MTPTrainer, build_config, load_model, merge_config, read_train_config


pytestmark = [pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available() or bool(os.environ.get("MULTITOKEN_SKIP_DISTRIBUTED")),
    reason="needs torch.distributed with gloo (unset MULTITOKEN_SKIP_DISTRIBUTED)"), pytest.mark.usefixtures("token_cache")]

ROOT = Path(__file__).resolve().parents[2]
LOSS_TOL = 1e-5
WEIGHT_TOL = 1e-4
# Constant lr after the 2 warmup steps (min_lr == lr), so a run of 2 steps resumed to 4 equals a run of 4.
COMMON = {"val_fraction": 0.2, "tensorboard": False, "min_lr": 3e-3, "num_threads": 1, "checkpoint_every": 2}

# Installed as sitecustomize in every launched process: records what each process writes under
# MT_AUDIT_DIR (open for writing, mkdir, rename, remove), per RANK ("launcher" without one).
AUDIT = r'''
import atexit, json, os
_dir, _out = os.environ.get("MT_AUDIT_DIR"), os.environ.get("MT_AUDIT_OUT")
if _dir and _out:
    _dir = os.path.realpath(_dir)
    _who = os.environ.get("RANK", "launcher")
    _seen = []
    def _inside(p):
        try:
            return os.path.realpath(os.fsdecode(p)).startswith(_dir)
        except (TypeError, ValueError):
            return False
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            if writing and isinstance(path, (str, bytes, os.PathLike)) and _inside(path):
                _seen.append(["open", os.fsdecode(path)])
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree"):
            if args and isinstance(args[0], (str, bytes, os.PathLike)) and _inside(args[0]):
                _seen.append([event, os.fsdecode(args[0])])
    import sys
    sys.addaudithook(_hook)
    @atexit.register
    def _dump():
        with open(os.path.join(_out, f"writes-{_who}-{os.getpid()}.json"), "w") as f:
            json.dump(_seen, f)
'''


def config(corpus, **over):
    return build_config("tiny", overrides=merge_config({"data": [str(corpus)], **COMMON}, over))


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") != "val"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model, _ = load_model(run_dir)  # a single process, no process group
    return model.state_dict()


def assert_weights_close(got: dict, ref: dict) -> None:
    assert set(got) == set(ref)
    worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
    assert worst <= WEIGHT_TOL, f"max |w - w_ref| = {worst:.2e}"


def launch(corpus, out: Path, audit: Path, *args: str) -> subprocess.CompletedProcess:
    """``multitoken train --nproc 2 ...`` with the write audit installed."""
    site = audit / "site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")]),
           "MT_AUDIT_DIR": str(out), "MT_AUDIT_OUT": str(audit), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "multitoken", "train", "--nproc", "2", "--out", str(out), "--no-progress",
           "--data", str(corpus), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def writers(audit: Path) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in audit.glob("writes-*.json"):
        who = f.name.split("-")[1]
        out.setdefault(who, []).extend(json.loads(f.read_text()))
    return out


def check_only_rank0_wrote(audit: Path) -> None:
    w = writers(audit)
    assert {"0", "1", "launcher"} <= set(w), f"audit saw processes {sorted(w)}"
    assert w["0"], "rank 0 wrote nothing (is the audit hook working?)"
    assert w["1"] == [] and w["launcher"] == [], f"only rank 0 may write: rank 1 {w['1'][:3]}, launcher {w['launcher'][:3]}"


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """One process, micro-batch 4 x grad_accum 2: loss rows of steps 1..4, weights at 4 and 5."""
    out = tmp_path_factory.mktemp("ref")
    trainer = MTPTrainer.from_config(config(corpus, grad_accum=2, max_steps=5), out, progress=False)
    trainer.fit(stop_at=4)
    at4 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rows = train_rows(out)
    trainer.fit()
    return {"rows": rows, "w4": at4, "w5": {k: v.clone() for k, v in trainer.model.state_dict().items()}}


def assert_curve_matches(rows: list[dict], ref_rows: list[dict]) -> None:
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [1, 2, 3, 4]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref_rows]  # all ranks' tokens counted
    for r, q in zip(rows, ref_rows):
        assert abs(r["loss"] - q["loss"]) <= LOSS_TOL, (r["step"], r["loss"], q["loss"])
        assert abs(r["grad_norm"] - q["grad_norm"]) <= 1e-4 * max(1.0, q["grad_norm"])
        for a, b in zip(r["head_losses"], q["head_losses"]):
            assert abs(a - b) <= LOSS_TOL


def test_ddp_two_ranks_match_one_process_and_resume_on_one(corpus, reference, tmp_path):
    out = tmp_path / "ddp"
    r = launch(corpus, out, tmp_path / "audit", "--preset", "tiny", "--parallel", "ddp", "--steps", "4",
               *[f"--set={k}={v}" for k, v in COMMON.items()])
    assert "2 ranks" in r.stderr  # the banner says how the run is spread
    check_only_rank0_wrote(tmp_path / "audit")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]
    assert_curve_matches(train_rows(out), reference["rows"])
    assert_weights_close(weights(out), reference["w4"])

    # The 2-rank checkpoint resumes in one process (micro 4 x accum 2: the same global batch).
    one = tmp_path / "one"
    shutil.copytree(out, one)
    saved = read_train_config(one / "checkpoint")
    trainer = MTPTrainer.from_config(build_config(None, None, {"max_steps": 5, "grad_accum": 2}, base=saved),
                                     one, resume=True, progress=False)
    assert trainer.step == 4
    trainer.fit()
    assert_weights_close(trainer.model.state_dict(), reference["w5"])


def test_fsdp_two_ranks_match_one_process_after_resume(corpus, reference, tmp_path):
    out = tmp_path / "fsdp"
    sets = [f"--set={k}={v}" for k, v in COMMON.items()]
    launch(corpus, out, tmp_path / "audit1", "--preset", "tiny", "--parallel", "fsdp", "--steps", "2", *sets)
    check_only_rank0_wrote(tmp_path / "audit1")
    # Resume with the same world size: sharded optimizer state is restored from the consolidated file.
    launch(corpus, out, tmp_path / "audit2", "--resume", "--parallel", "fsdp", "--steps", "4")
    check_only_rank0_wrote(tmp_path / "audit2")
    assert_curve_matches(train_rows(out), reference["rows"])
    assert_weights_close(weights(out), reference["w4"])  # the consolidated checkpoint loads in one process


# --------------------------------------------------------------------------- in-process (one rank)


@pytest.fixture
def one_rank_group():
    import multitoken.training.distributed as distributed

    yield
    distributed.destroy()


def test_fsdp_reduces_each_unit_once_per_step(corpus, tmp_path, monkeypatch, one_rank_group):
    """n_future=3 heads and grad_accum=2 make 8 backward calls per step: still one gradient
    reduction per FSDP unit. One rank, so counting FSDP's reduce calls needs no second process."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    from multitoken.training.sharding import shard_units

    calls = []
    real = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    cfg = config(corpus, grad_accum=2, max_steps=2, model={"n_future": 3})
    plain = MTPTrainer.from_config(cfg, tmp_path / "plain", progress=False)
    trainer = MTPTrainer.from_config(cfg, tmp_path / "fsdp", progress=False, parallel="fsdp")
    try:
        units = len(shard_units(trainer.model)) + 1  # + the root
        for step in range(2):
            calls.clear()
            m = trainer.train_step(trainer.batch_for_step(step))
            assert len(calls) == units
            p = plain.train_step(plain.batch_for_step(step))
            assert abs(m["loss"] - p["loss"]) <= LOSS_TOL
        path = trainer.save_checkpoint()
    finally:
        trainer.shutdown()
    assert_weights_close(weights(path), plain.model.state_dict())


def test_nproc_refused_inside_torchrun(monkeypatch, capsys):
    from multitoken.cli.main import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2", "--preset", "tiny"]) == 2
    assert "--nproc" in capsys.readouterr().err
