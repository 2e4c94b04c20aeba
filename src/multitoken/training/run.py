"""Whole training runs: :func:`train` (a config into a run folder) and :func:`train_demo_model`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from multitoken.training.checkpoint import find_checkpoint, load_trainer_state, read_train_config
from multitoken.training.config import TrainConfig, build_config, merge_config
from multitoken.training.trainer import MTPTrainer


def train(config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, parallel: str | None = None) -> dict[str, Any]:
    """Build a trainer from ``config`` and run ``fit`` (``parallel``: ddp | fsdp under torchrun)."""
    trainer = MTPTrainer.from_config(config, out_dir, resume=resume, progress=progress, parallel=parallel)
    try:
        result = trainer.fit()
    except BaseException:
        trainer.shutdown()
        raise
    trainer.shutdown(finished=True)
    return result


def train_demo_model(out_dir: str | os.PathLike, *, steps: int | None = None, device: str = "auto",
                     progress: bool = True, overrides: dict | None = None) -> Path:
    """Train the ``small`` preset on the stdlib corpus into ``out_dir/model`` and return its
    checkpoint directory. A finished checkpoint there is reused; an unfinished one is resumed."""
    run_dir = Path(out_dir) / "model"
    ckpt = find_checkpoint(run_dir)
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        saved = TrainConfig.from_dict(read_train_config(ckpt), str(ckpt))
        if state["step"] >= saved.total_steps():
            return ckpt
    extra = {"device": device}
    if steps is not None:
        extra["max_steps"] = steps
    base = read_train_config(ckpt) if ckpt is not None else None
    config = build_config("small" if base is None else None, None, merge_config(overrides, extra), base=base)
    result = MTPTrainer.from_config(config, run_dir, resume=ckpt is not None, progress=progress).fit()
    if result["status"] == "interrupted":
        raise KeyboardInterrupt
    return result["checkpoint"]
