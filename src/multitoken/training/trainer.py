"""Training: ``MTPTrainer`` (its configuration, ``TrainConfig``, lives in ``train_config.py``).

One optimizer step (``MTPTrainer.train_step``) runs ``grad_accum`` micro-batches through the
memory-efficient MTP backward (``loss.mtp_backward``: trunk once, heads one at a time), clips
the gradient norm and steps AdamW and the warmup + cosine schedule. ``fit`` loops over steps
whose data is a pure function of the step number (``data.batch_indices``), so a checkpoint needs
only the step to resume exactly; it logs to ``metrics.jsonl`` (and TensorBoard when installed),
validates every ``eval_every`` steps and checkpoints atomically every ``checkpoint_every``.

Distributed training (``parallel="ddp"|"fsdp"`` under torchrun) is delegated to
``distributed.py``, imported only when ``parallel`` is set: it wraps the model, runs the step's
backward passes without gradient communication and synchronises gradients once per optimizer
step; rank 0 alone logs and writes consolidated checkpoints (loadable in one process).
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitoken.training.checkpoint import (
    CHECKPOINT,
    CheckpointError,
    CheckpointNotFoundError,
    find_checkpoint,
    load_checkpoint_tokenizer,
    load_model_config,
    load_trainer_state,
    load_weights,
    read_train_config,
    save_checkpoint,
    WEIGHTS,
)
from multitoken.training.loss import MTPLoss, mtp_backward, naive_backward
from multitoken.model.native import MTPModel
from multitoken.data.tokenizer import Tokenizer, make_tokenizer
from multitoken.training.config import (  # noqa: F401  (re-exported: the configuration API is also multitoken.train's)
    PRESETS, TrainConfig, build_config, load_config_file, merge_config, parse_set, preset,
)

METRICS = "metrics.jsonl"


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became NaN/inf; training stopped (CLI exit code 2)."""


# =========================================================================== helpers


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available; use --device cpu or auto")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device={name!r} but MPS is not available; use --device cpu or auto")
    return dev


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype. ``auto`` = bf16 on a GPU that supports it; float32 on CPU (where bf16
    matmuls are slower than float32 without AMX)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("dtype='bfloat16' is not supported by this GPU; use --dtype float32")
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def lr_factor(step: int, warmup: int, total: int, final_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based): linear warmup, then
    cosine decay to ``final_ratio`` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup - 1)
    progress = min(1.0, (step - warmup) / span)
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on 2-D weights (matrices, embeddings) only; norms and biases are exempt."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():  # unique parameters, deterministic order
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_tokenizer(config: TrainConfig, progress: bool = False) -> Tokenizer:
    if config.tokenizer == "byte":
        return make_tokenizer("byte")
    from multitoken.data.corpus import iter_documents, split_of

    # Train the BPE on the training split only: validation text stays unseen.
    texts = (d.text for d in iter_documents(config.data, max_docs=config.max_docs)
             if config.val_fraction == 0 or split_of(d.name, config.val_fraction) == "train")
    return make_tokenizer("bpe", texts, config.bpe_vocab_size, show_progress=progress)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        # numpy arrays are not weights_only-loadable: store the MT19937 key as a tensor.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    py = state.get("python")
    if py:
        random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state.get("numpy")
    if npst:
        np.random.set_state((npst[0], npst[1].numpy().astype(np.uint32), int(npst[2]), int(npst[3]), npst[4]))


def _floats(x: Tensor) -> list[float]:
    return [float(v) for v in x.detach().float().cpu()]


def format_head_table(ev: dict) -> str:
    """A small text table of per-head validation loss / top-1 accuracy."""
    lines = ["head  predicts  val loss  val acc", "----  --------  --------  -------"]
    for i, (loss, acc) in enumerate(zip(ev["head_losses"], ev["head_accuracy"])):
        lines.append(f"{i:>4}  {'t+' + str(i + 1):>8}  {loss:8.4f}  {acc:7.1%}")
    lines.append(f"next-token perplexity {ev['perplexity']:.3f} (step {ev['step']}, {ev['tokens']} tokens)")
    return "\n".join(lines)


# =========================================================================== trainer


class _CompiledModel:
    """The functions the backward helpers call, compiled; parameters stay the model's."""

    def __init__(self, model: MTPModel):
        self.head_hiddens = torch.compile(model.head_hiddens)
        self.head_logits = torch.compile(model.head_logits)
        self._forward = torch.compile(model)

    def __call__(self, tokens: Tensor) -> Tensor:
        return self._forward(tokens)


Batch = Any  # (tokens, doc_ids) | {"input_ids": ..., "doc_ids": ...} | tokens | a list of those


class MTPTrainer:
    """Trains an :class:`MTPModel` with an MTP objective.

    Build one from a config with :meth:`from_config` (tokenizer, corpus, model, resume), or
    directly from a model and packed datasets. ``train_step`` is one optimizer step,
    ``evaluate`` one validation pass, ``fit`` the whole run.
    """

    def __init__(self, model: MTPModel, config: TrainConfig, train_data=None, val_data=None,
                 tokenizer: Tokenizer | None = None, out_dir: str | os.PathLike | None = None, *,
                 rank: int = 0, world_size: int = 1, progress: bool = True,
                 parallel: str | None = None, dist_env: Any = None):
        # --- distributed (multitoken.distributed): rank/world/device come from torchrun's env
        self.parallel = None  # a distributed.ParallelModel (ddp | fsdp) or None
        self._owns_process_group = False
        if parallel is not None:
            from multitoken.training.distributed import init_distributed

            if dist_env is None:
                dist_env, self._owns_process_group = init_distributed(config.device), True
            rank, world_size = dist_env.rank, dist_env.world_size
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = dist_env.device if dist_env is not None else resolve_device(config.device)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.amp_dtype = resolve_dtype(config.dtype, self.device)
        self.model = model.to(self.device)
        if parallel is not None:
            from multitoken.training.distributed import wrap_model

            # Before the optimizer: FSDP2 replaces the parameters by sharded ones.
            self.parallel = wrap_model(self.model, parallel, dist_env, one_backward=not config.memory_efficient)
        # What train_step calls. A distributed wrapper replaces this; checkpoints save self.model.
        self.train_model = _CompiledModel(self.model) if config.compile else self.model
        if self.parallel is not None:
            self.train_model = self.parallel.train_model(self.train_model)
        self.loss_fn = MTPLoss(model.cfg.n_future, config.weighting, config.aux_weight, config.head_weights)
        self.tokenizer = tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and rank == 0
        self.total_steps = config.total_steps(world_size)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, functools.partial(
            lr_factor, warmup=config.warmup_steps, total=self.total_steps, final_ratio=config.final_lr / config.lr))
        self.step = 0  # optimizer steps done; also the data position
        self.tokens_seen = 0  # tokens consumed by those steps, all ranks together
        self.last_eval: dict | None = None
        self.last_checkpoint: Path | None = None
        self._backward = (functools.partial(mtp_backward, chunk_size=config.ce_chunk)
                          if config.memory_efficient else naive_backward)
        self._stop_signal: int | None = None
        self._tb = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                    progress: bool = True, rank: int = 0, world_size: int = 1,
                    parallel: str | None = None) -> "MTPTrainer":
        """Tokenizer + corpus + model for ``config``; with ``resume`` restore the checkpoint in
        ``out_dir``. Nothing is written to ``out_dir`` here (bad input leaves it untouched).
        ``parallel`` (ddp | fsdp): join torchrun's process group (rank/world from its env)."""
        from multitoken.data.corpus import PackedDataset, build_token_store

        env = None
        if parallel is not None:
            from multitoken.training.distributed import init_distributed, main_first

            env = init_distributed(config.device)
            rank, world_size = env.rank, env.world_size
            progress = progress and rank == 0
        out_dir = Path(out_dir)
        ckpt = find_checkpoint(out_dir)
        if resume:
            if ckpt is None:
                raise CheckpointNotFoundError(f"nothing to resume: no checkpoint in {out_dir}")
            saved = read_train_config(ckpt)
            tokenizer = load_checkpoint_tokenizer(ckpt)
            check_resume_compatible(saved, config, ckpt)
        else:
            if ckpt is not None:
                raise CheckpointError(f"{out_dir} already holds a checkpoint; pass --resume to continue it "
                                      "or choose another --out")
            if env is None:
                tokenizer = build_tokenizer(config, progress)
            else:  # one BPE for all ranks: rank 0's
                tokenizer = main_first(lambda: build_tokenizer(config, progress), share=True)
        model_cfg = config.model_config(tokenizer.vocab_size)
        if resume:
            saved_cfg = load_model_config(ckpt)
            diffs = [f"{k}: checkpoint {v!r}, config {getattr(model_cfg, k)!r}"
                     for k, v in saved_cfg.to_dict().items() if getattr(model_cfg, k) != v]
            if diffs:
                raise CheckpointError(f"cannot resume {ckpt}: the model config differs ({'; '.join(diffs)})")
        kw = dict(val_fraction=config.val_fraction, progress=progress, max_docs=config.max_docs)

        def datasets():
            train = PackedDataset(build_token_store(config.data, tokenizer, "train", **kw), config.seq_len)
            val = None
            if config.val_fraction > 0:
                val = PackedDataset(build_token_store(config.data, tokenizer, "val", **kw), config.seq_len)
            return train, val

        # Distributed: rank 0 tokenises into the cache first, the others then read it.
        train, val = datasets() if env is None else main_first(datasets)
        torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
        model = MTPModel(model_cfg)
        trainer = cls(model, config, train, val, tokenizer, out_dir, rank=rank, world_size=world_size,
                      progress=progress, parallel=parallel, dist_env=env)
        trainer._owns_process_group = env is not None
        trainer._check_data()
        if resume:
            trainer.load_checkpoint(ckpt)
        return trainer

    def _check_data(self) -> None:
        from multitoken.data.corpus import DataError, steps_per_epoch

        if self.train_data is not None and steps_per_epoch(len(self.train_data), self.config.micro_batch_size,
                                                           self.world_size) == 0:
            raise DataError(f"the training split has {len(self.train_data)} sequences of seq_len="
                            f"{self.config.seq_len}, fewer than one batch of {self.config.micro_batch_size}"
                            f"{f' x {self.world_size} ranks' if self.world_size > 1 else ''}; "
                            "add data or lower --batch-size / --seq-len")
        if self.val_data is not None and len(self.val_data) < self.world_size:
            raise DataError(f"the validation split has {len(self.val_data)} sequences of seq_len="
                            f"{self.config.seq_len}; add data, raise val_fraction, lower --seq-len, "
                            "or set val_fraction=0")

    # ------------------------------------------------------------------ one step
    def prepare_multi_targets(self, tokens: Tensor, doc_ids: Tensor | None = None) -> list[Tensor]:
        """Per-head targets [(B, T)] * n_future: head i gets token t+i+1, -100 past the end of
        the sequence or of the document (delegates to ``MTPLoss.targets`` / ``shift_targets``)."""
        return self.loss_fn.targets(tokens, doc_ids)

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @staticmethod
    def _micro_batches(batch: Batch) -> list[tuple[Tensor, Tensor | None]]:
        def one(b):
            if isinstance(b, dict):
                return b["input_ids"], b.get("doc_ids")
            if isinstance(b, Tensor):
                return b, None
            tokens, doc_ids = b
            return tokens, doc_ids

        if isinstance(batch, list):
            return [one(b) for b in batch]
        return [one(batch)]

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step over ``batch``: a (tokens (B, T), doc_ids (B, T) | None) pair,
        a dict with ``input_ids`` (+ ``doc_ids``), or a list of those (micro-batches whose
        gradients are accumulated). Returns the step's metrics as Python numbers.

        Raises :class:`TrainingDiverged` (before touching the weights) on a NaN/inf loss or
        gradient norm."""
        micro = self._micro_batches(batch)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        totals: dict[str, Tensor] = {}
        n_tokens = 0
        par = self.parallel
        # Distributed: no gradient communication inside the step (see distributed.py) ...
        with par.step_context() if par is not None else contextlib.nullcontext():
            for j, (tokens, doc_ids) in enumerate(micro):
                tokens = tokens.to(self.device, non_blocking=True)
                doc_ids = doc_ids.to(self.device, non_blocking=True) if doc_ids is not None else None
                n_tokens += tokens.numel()
                last = j == len(micro) - 1
                with self._autocast(), par.micro_batch(last) if par is not None else contextlib.nullcontext():
                    out = self._backward(self.train_model, self.loss_fn, tokens, doc_ids, scale=1.0 / len(micro))
                for k in ("loss", "primary", "auxiliary", "head_losses", "head_accuracy"):
                    totals[k] = totals.get(k, 0) + out[k].detach().float() / len(micro)
        if par is not None:
            from multitoken.training.distributed import all_reduce_mean_dict

            par.sync_gradients()  # ... and one synchronisation per optimizer step
            totals = all_reduce_mean_dict(totals)  # every rank logs and checks the global means
        loss = float(totals["loss"])
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss is {loss} at step {self.step + 1}")
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else float("inf")
        grad_norm = (float(par.clip_grad_norm_(max_norm)) if par is not None
                     else float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)))
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"gradient norm is {grad_norm} at step {self.step + 1}")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += n_tokens * self.world_size
        return {
            "step": self.step, "tokens": self.tokens_seen, "lr": lr, "loss": loss,
            "primary": float(totals["primary"]), "auxiliary": float(totals["auxiliary"]),
            "head_losses": _floats(totals["head_losses"]), "head_accuracy": _floats(totals["head_accuracy"]),
            "grad_norm": grad_norm,
        }

    def batch_for_step(self, step: int) -> list[tuple[Tensor, Tensor]]:
        """The micro-batches of optimizer step ``step`` for this rank: a pure function of the step."""
        from multitoken.data.corpus import batch_indices, get_batch

        n = len(self.train_data)
        b = self.config.micro_batch_size
        return [get_batch(self.train_data, batch_indices(n, step * self.config.grad_accum + j, b,
                                                         self.config.seed, self.rank, self.world_size))
                for j in range(self.config.grad_accum)]

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, Any] | None:
        """Per-head validation loss and top-1 accuracy, and next-token perplexity, over a fixed
        set of validation sequences (the same ones every time). None without validation data."""
        from multitoken.data.corpus import batch_indices, get_batch

        if self.val_data is None:
            return None
        n = len(self.val_data)
        b = max(1, min(self.config.micro_batch_size, n // self.world_size))
        n_batches = min(max_batches or self.config.eval_batches, max(1, n // (b * self.world_size)))
        nf = self.model.cfg.n_future
        ce = torch.zeros(nf, dtype=torch.float64)
        count = torch.zeros(nf, dtype=torch.long)
        correct = torch.zeros(nf, dtype=torch.long)
        was_training = self.model.training
        self.model.eval()
        for j in range(n_batches):
            # Seed 0 and its own index sequence: the validation set does not depend on the run's seed.
            tokens, doc_ids = get_batch(self.val_data, batch_indices(n, j, b, 0, self.rank, self.world_size))
            tokens, doc_ids = tokens.to(self.device), doc_ids.to(self.device)
            with self._autocast():
                hiddens = self.model.head_hiddens(tokens)
                for i, (g, target) in enumerate(zip(hiddens, self.prepare_multi_targets(tokens, doc_ids))):
                    s, c, r = self.loss_fn.head_statistics(self.model.head_logits(i, g), target)
                    ce[i] += s.double().cpu()
                    count[i] += c.cpu()
                    correct[i] += r.cpu()
        self.model.train(was_training)
        if self.parallel is not None:
            from multitoken.training.distributed import all_reduce_sum

            ce, count, correct = all_reduce_sum(ce), all_reduce_sum(count), all_reduce_sum(correct)
        out = self.loss_fn.combine(ce, count, correct)
        return {
            "split": "val", "step": self.step, "tokens": self.tokens_seen,
            "loss": float(out["loss"]), "primary": float(out["primary"]), "auxiliary": float(out["auxiliary"]),
            "head_losses": _floats(out["head_losses"]), "head_accuracy": _floats(out["head_accuracy"]),
            "perplexity": math.exp(min(float(out["primary"]), 700.0)), "val_tokens": int(count[0]),
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights: loadable with ``torch.load(weights_only=True)``."""
        return {
            "step": self.step, "tokens_seen": self.tokens_seen,
            # Distributed: consolidated on rank 0 in single-process layout (a collective).
            "optimizer": (self.optimizer.state_dict() if self.parallel is None
                          else self.parallel.optimizer_state_dict(self.optimizer)),
            "scheduler": self.scheduler.state_dict(),
            "rng": _rng_state(),
            # The data position is the step (data.batch_indices is a pure function of it).
            "data": {"step": self.step, "seed": self.config.seed, "world_size": self.world_size},
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint. Distributed: every rank must call it (the weights and optimizer
        state are gathered), rank 0 alone writes."""
        if self.out_dir is None or self.tokenizer is None:
            raise ValueError("save_checkpoint needs out_dir and tokenizer")
        model = self.model
        if self.parallel is not None and self.parallel.kind == "fsdp":
            full = self.parallel.full_state_dict()  # full CPU tensors on rank 0, {} elsewhere
            if self.rank == 0:
                model = MTPModel(self.model.cfg)
                model.load_state_dict(full)
        state = self.state_dict()
        if self.rank != 0:
            self.last_checkpoint = self.out_dir / CHECKPOINT
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(
            self.out_dir, model, self.tokenizer, train_config=self.config.to_dict(),
            trainer_state=state, eval_metrics=self.last_eval)
        return self.last_checkpoint

    def shutdown(self) -> None:
        """``close()``, then leave the process group this trainer joined (no-op in one process)."""
        self.close()
        if self._owns_process_group:
            from multitoken.training.distributed import destroy

            destroy()
            self._owns_process_group = False

    def load_checkpoint(self, ckpt: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, step, RNG from a checkpoint directory."""
        ckpt = Path(ckpt)
        state = load_trainer_state(ckpt)
        if self.parallel is not None and self.parallel.kind == "fsdp":
            plain = MTPModel(self.model.cfg)  # checked and loaded whole, then sharded
            load_weights(plain, ckpt / WEIGHTS)
            self.parallel.load_full_state_dict(plain.state_dict())
        else:
            load_weights(self.model, ckpt / WEIGHTS)
        try:
            if self.parallel is not None:
                self.parallel.load_optimizer_state_dict(self.optimizer, state["optimizer"])
            else:
                self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {ckpt} does not match the model: {e}") from None
        # The schedule follows the current config (max_steps may have been raised to train longer).
        self.scheduler.lr_lambdas = [functools.partial(
            lr_factor, warmup=self.config.warmup_steps, total=self.total_steps,
            final_ratio=self.config.final_lr / self.config.lr)] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.config.lr
            g["lr"] = self.config.lr * lr_factor(int(state["step"]), self.config.warmup_steps, self.total_steps,
                                                 self.config.final_lr / self.config.lr)
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        _set_rng_state(state["rng"])
        self.last_checkpoint = ckpt

    # ------------------------------------------------------------------ the loop
    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / METRICS if self.out_dir is not None else None

    def _log(self, row: dict) -> None:
        if self.rank != 0:
            return
        if self.metrics_path is not None:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            prefix = "val" if row.get("split") == "val" else "train"
            for k in ("loss", "primary", "auxiliary", "lr", "tokens_per_s", "perplexity", "grad_norm"):
                if k in row:
                    self._tb.add_scalar(f"{prefix}/{k}", row[k], row["step"])
            for i, (l, a) in enumerate(zip(row["head_losses"], row["head_accuracy"])):
                self._tb.add_scalar(f"{prefix}/head{i}_loss", l, row["step"])
                self._tb.add_scalar(f"{prefix}/head{i}_accuracy", a, row["step"])

    def _truncate_metrics(self) -> None:
        """Drop rows written after the checkpoint we start from (a killed run's tail)."""
        p = self.metrics_path
        if p is None or not p.exists() or self.rank != 0:
            return
        keep = []
        for line in p.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= self.step:
                    keep.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, p)

    def _open_tensorboard(self) -> None:
        if not self.config.tensorboard or self.out_dir is None or self.rank != 0:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional: `pip install tensorboard`
            return
        self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=self.step + 1)

    @contextlib.contextmanager
    def _signal_handlers(self):
        """SIGINT/SIGTERM ask the loop to checkpoint and stop after the current step; a second
        signal acts as usual (KeyboardInterrupt / termination)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {}

        def handler(signum, frame):
            self._stop_signal = signum
            signal.signal(signum, previous[signum])  # the next one is not deferred

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def close(self) -> None:
        """Release what the trainer holds beyond memory (TensorBoard writer)."""
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step with a checkpoint (what SIGINT does)."""
        self._stop_signal = signum

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` (or ``stop_at`` steps, checkpointing there).

        Returns ``{"step", "tokens", "status", "eval", "checkpoint"}`` with status one of
        ``finished``, ``stopped`` (stop_at reached) or ``interrupted`` (SIGINT/SIGTERM);
        ``signal`` holds the signal number when interrupted. Raises :class:`TrainingDiverged`
        on a NaN/inf loss, leaving the last checkpoint as it was."""
        from tqdm import tqdm

        if self.train_data is None:
            raise ValueError("fit() needs training data")
        cfg = self.config
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        if self.out_dir is not None and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._truncate_metrics()
            self._open_tensorboard()
        self._stop_signal = None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="train")
        status = "finished"
        # Throughput of the training steps alone (evaluation and checkpoints excluded),
        # averaged over each logging interval.
        span_time, span_tokens = 0.0, 0
        try:
            with self._signal_handlers():
                while self.step < end:
                    t0, tokens0 = time.perf_counter(), self.tokens_seen
                    try:
                        m = self.train_step(self.batch_for_step(self.step))
                    except TrainingDiverged as e:
                        where = (f"the last good checkpoint is {self.last_checkpoint}"
                                 if self.last_checkpoint else "no checkpoint was written")
                        raise TrainingDiverged(f"{e}; training stopped ({where}). Try a lower --lr "
                                               "or grad_clip") from None
                    span_time += time.perf_counter() - t0
                    span_tokens += self.tokens_seen - tokens0
                    tok_s = span_tokens / max(span_time, 1e-9)
                    step = self.step
                    last = step == end
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
                    if step % cfg.log_every == 0 or last:
                        self._log({**m, "tokens_per_s": tok_s})
                        span_time, span_tokens = 0.0, 0
                    if self.val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
                        self.last_eval = self.evaluate()
                        self._log(self.last_eval)
                        if self.progress:
                            bar.write(f"step {step}: val loss {self.last_eval['loss']:.4f}, head acc "
                                      + " ".join(f"{a:.1%}" for a in self.last_eval["head_accuracy"]))
                    stop = self._stop_signal is not None
                    if self.parallel is not None:
                        from multitoken.training.distributed import any_rank

                        stop = any_rank(stop)  # all ranks stop after the same step
                    # Distributed: every rank takes part in gathering the checkpoint; rank 0 writes.
                    if self.out_dir is not None and (self.rank == 0 or self.parallel is not None) and (
                            last or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
                        self.save_checkpoint()
                    if stop:
                        status = "interrupted"
                        break
                else:
                    if self.step < self.total_steps:
                        status = "stopped"
        finally:
            bar.close()
            self.close()
        return {"step": self.step, "tokens": self.tokens_seen, "status": status, "eval": self.last_eval,
                "checkpoint": self.last_checkpoint, "signal": self._stop_signal}


def check_resume_compatible(saved: dict, config: TrainConfig, ckpt: Path) -> None:
    """The tokenizer a checkpoint was trained with must be the one the config asks for."""
    kind = saved.get("tokenizer", "byte")
    if kind != config.tokenizer:
        raise CheckpointError(f"cannot resume {ckpt}: it was trained with the {kind!r} tokenizer, "
                              f"the config asks for {config.tokenizer!r}")
    if kind == "bpe" and saved.get("bpe_vocab_size") != config.bpe_vocab_size:
        raise CheckpointError(f"cannot resume {ckpt}: its BPE vocabulary was trained with vocab size "
                              f"{saved.get('bpe_vocab_size')}, the config asks for {config.bpe_vocab_size}")


def train(config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
          progress: bool = True, parallel: str | None = None) -> dict[str, Any]:
    """Build a trainer from ``config`` and run ``fit`` (``parallel``: ddp | fsdp under torchrun)."""
    trainer = MTPTrainer.from_config(config, out_dir, resume=resume, progress=progress, parallel=parallel)
    try:
        return trainer.fit()
    finally:
        trainer.shutdown()


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
