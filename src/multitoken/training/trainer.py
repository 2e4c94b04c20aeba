"""Training: ``MTPTrainer`` (its configuration, ``TrainConfig``, lives in ``config.py``).

One optimizer step (``MTPTrainer.train_step``) runs ``grad_accum`` micro-batches through the
memory-efficient MTP backward (``loss.mtp_backward``: trunk once, heads one at a time), clips
the gradient norm and steps AdamW and the warmup + cosine schedule (``schedule.lr_factor``).
``fit`` loops over steps whose data is a pure function of the step number
(``data.packing.batch_indices``), so a checkpoint needs only the step to resume exactly; it logs
to ``metrics.jsonl`` (and TensorBoard when installed), validates every ``eval_every`` steps and
checkpoints atomically every ``checkpoint_every``.

Data parallelism goes through ``self.parallel``: in one process a
:class:`~multitoken.training.parallel.SingleProcess` whose hooks are the plain operations; with
``parallel="ddp"|"fsdp"`` under torchrun a wrapper from ``sharding.py`` (imported only then)
that runs the step's backward passes without gradient communication and synchronises gradients
once per optimizer step; rank 0 alone logs and writes consolidated checkpoints (loadable in one
process).
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from multitoken.data import Tokenizer
from multitoken.data.packing import batch_indices, get_batch
from multitoken.errors import MultitokenError
from multitoken.model.native import MTPModel
from multitoken.training.checkpoint import (
    CHECKPOINT, WEIGHTS, CheckpointError, CheckpointNotFoundError, find_checkpoint, kept_files,
    load_checkpoint_tokenizer, load_trainer_state, load_weights, read_train_config, save_checkpoint,
)
from multitoken.training.config import TrainConfig
from multitoken.training.inputs import (
    build_datasets, build_tokenizer, check_data, check_resume_compatible, check_resume_model,
)
from multitoken.training.loss import MTPLoss, mtp_backward, naive_backward
from multitoken.training.metrics import METRICS, MetricsLog, per_head, percent
from multitoken.training.parallel import SingleProcess
from multitoken.training.rundir import TENSORBOARD, check_run_dir, claim_run_dir
from multitoken.training.runtime import deferred_signals, resolve_device, rng_state, set_rng_state, training_dtype
from multitoken.training.schedule import lr_factor, param_groups
from multitoken.training.steps import Batch, CompiledModel, floats, micro_batches, validation_sums


class TrainingDiverged(MultitokenError):
    """The loss or the gradient norm became NaN/inf; training stopped (CLI exit code 2)."""


def _call(fn: Callable[[], Any], share: bool = False) -> Any:
    """One process: what ``distributed.main_first`` does for rank 0 alone."""
    return fn()


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
        self._owns_process_group = False
        if parallel is not None:  # rank/world/device come from torchrun's env
            from multitoken.training.distributed import init_distributed

            if dist_env is None:
                dist_env, self._owns_process_group = init_distributed(config.device), True
            rank, world_size = dist_env.rank, dist_env.world_size
        self.config = config
        self.rank, self.world_size = rank, world_size
        self.device = dist_env.device if dist_env is not None else resolve_device(config.device)
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.amp_dtype = training_dtype(config.dtype, self.device)
        self.model = model.to(self.device)
        if parallel is None:
            self.parallel = SingleProcess(self.model)
        else:
            from multitoken.training.sharding import wrap_model

            # Before the optimizer: FSDP2 replaces the parameters by sharded ones.
            self.parallel = wrap_model(self.model, parallel, dist_env, one_backward=not config.memory_efficient)
        # What train_step calls (checkpoints save self.model).
        self.train_model = self.parallel.train_model(CompiledModel(self.model) if config.compile else self.model)
        self.loss_fn = MTPLoss(model.cfg.n_future, config.weighting, config.aux_weight, config.head_weights)
        self.tokenizer = tokenizer
        self.train_data, self.val_data = train_data, val_data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.progress = progress and rank == 0
        self.total_steps = config.total_steps(world_size)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, eps=config.eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda())
        self.step = 0  # optimizer steps done; also the data position
        self.tokens_seen = 0  # tokens consumed by those steps, all ranks together
        self.last_eval: dict | None = None
        self.last_checkpoint: Path | None = None
        self._backward = (functools.partial(mtp_backward, chunk_size=config.ce_chunk)
                          if config.memory_efficient else naive_backward)
        self._stop_signal: int | None = None
        self.metrics = MetricsLog(self.metrics_path if rank == 0 else None)

    def _lr_lambda(self) -> Callable[[int], float]:
        cfg = self.config
        return functools.partial(lr_factor, warmup=cfg.warmup_steps, total=self.total_steps,
                                 final_ratio=cfg.final_lr / cfg.lr)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: TrainConfig, out_dir: str | os.PathLike, *, resume: bool = False,
                    progress: bool = True, rank: int = 0, world_size: int = 1,
                    parallel: str | None = None) -> "MTPTrainer":
        """Tokenizer + corpus + model for ``config``; with ``resume`` restore the checkpoint in
        ``out_dir``. Nothing is written to ``out_dir`` here (bad input leaves it untouched), and a
        folder that is not ours is refused before any work.
        ``parallel`` (ddp | fsdp): join torchrun's process group (rank/world from its env)."""
        out_dir = check_run_dir(out_dir)
        env, first = None, _call
        if parallel is not None:
            from multitoken.training.distributed import init_distributed, main_first as first

            env = init_distributed(config.device)
            rank, world_size = env.rank, env.world_size
            progress = progress and rank == 0
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
            # One BPE for all ranks: rank 0's.
            tokenizer = first(lambda: build_tokenizer(config, progress), share=True)
        model_cfg = config.model_config(tokenizer.vocab_size)
        if resume:
            check_resume_model(ckpt, model_cfg)
        # Distributed: rank 0 tokenises into the cache first, the others then read it.
        train, val = first(lambda: build_datasets(config, tokenizer, progress))
        torch.manual_seed(config.seed)  # the same initial weights on every rank and every run
        trainer = cls(MTPModel(model_cfg), config, train, val, tokenizer, out_dir, rank=rank,
                      world_size=world_size, progress=progress, parallel=parallel, dist_env=env)
        trainer._owns_process_group = env is not None
        check_data(train, val, config, trainer.world_size)
        if resume:
            trainer.load_checkpoint(ckpt)
        return trainer

    # ------------------------------------------------------------------ one step
    def prepare_multi_targets(self, tokens: Tensor, doc_ids: Tensor | None = None) -> list[Tensor]:
        """Per-head targets [(B, T)] * n_future: head i gets token t+i+1, -100 past the end of
        the sequence or of the document (delegates to ``MTPLoss.targets`` / ``shift_targets``)."""
        return self.loss_fn.targets(tokens, doc_ids)

    def _autocast(self):
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self, batch: Batch) -> dict[str, Any]:
        """One optimizer step over ``batch``: a (tokens (B, T), doc_ids (B, T) | None) pair,
        a dict with ``input_ids`` (+ ``doc_ids``), or a list of those (micro-batches whose
        gradients are accumulated). Returns the step's metrics as Python numbers.

        Raises :class:`TrainingDiverged` (before touching the weights) on a NaN/inf loss or
        gradient norm."""
        micro = micro_batches(batch)
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        totals: dict[str, Tensor] = {}
        n_tokens = 0
        par = self.parallel
        with par.step_context():  # distributed: no gradient communication inside the step ...
            for j, (tokens, doc_ids) in enumerate(micro):
                tokens = tokens.to(self.device, non_blocking=True)
                doc_ids = doc_ids.to(self.device, non_blocking=True) if doc_ids is not None else None
                n_tokens += tokens.numel()
                with self._autocast(), par.micro_batch(j == len(micro) - 1):
                    out = self._backward(self.train_model, self.loss_fn, tokens, doc_ids, scale=1.0 / len(micro))
                for k in ("loss", "primary", "auxiliary", "head_losses", "head_accuracy", "head_counts"):
                    totals[k] = totals.get(k, 0) + out[k].detach().float() / len(micro)
        par.sync_gradients()  # ... and one synchronisation per optimizer step
        totals = par.mean_over_ranks(totals)  # every rank logs and checks the global means
        loss = float(totals["loss"])
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise TrainingDiverged(f"loss is {loss} at step {self.step + 1}")
        grad_norm = par.clip_grad_norm_(self.config.grad_clip if self.config.grad_clip > 0 else float("inf"))
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
            # A head with no target in the step: None ("no targets"), never a loss of 0.
            "head_losses": per_head(floats(totals["head_losses"]), floats(totals["head_counts"])),
            "head_accuracy": per_head(floats(totals["head_accuracy"]), floats(totals["head_counts"])),
            "grad_norm": grad_norm,
        }

    def batch_for_step(self, step: int) -> list[tuple[Tensor, Tensor]]:
        """The micro-batches of optimizer step ``step`` for this rank: a pure function of the step."""
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
        if self.val_data is None:
            return None
        n = len(self.val_data)
        b = max(1, min(self.config.micro_batch_size, n // self.world_size))
        n_batches = min(max_batches or self.config.eval_batches, max(1, n // (b * self.world_size)))
        was_training = self.model.training
        self.model.eval()
        # Seed 0 and its own index sequence: the validation set does not depend on the run's seed.
        batches = (get_batch(self.val_data, batch_indices(n, j, b, 0, self.rank, self.world_size))
                   for j in range(n_batches))
        with self._autocast():
            ce, count, correct = validation_sums(self.model, self.loss_fn, batches, self.device)
        self.model.train(was_training)
        par = self.parallel
        ce, count, correct = par.sum_over_ranks(ce), par.sum_over_ranks(count), par.sum_over_ranks(correct)
        out = self.loss_fn.combine(ce, count, correct)
        counts = count.tolist()
        primary = per_head([float(out["primary"])], counts[:1])[0]  # None: no next-token target at all
        return {
            "split": "val", "step": self.step, "tokens": self.tokens_seen,
            "loss": float(out["loss"]), "primary": primary, "auxiliary": float(out["auxiliary"]),
            "head_losses": per_head(floats(out["head_losses"]), counts),
            "head_accuracy": per_head(floats(out["head_accuracy"]), counts),
            "perplexity": None if primary is None else math.exp(min(primary, 700.0)), "val_tokens": counts[0],
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything but the weights: loadable with ``torch.load(weights_only=True)``."""
        return {
            "step": self.step, "tokens_seen": self.tokens_seen,
            # Distributed: consolidated on rank 0 in single-process layout (a collective).
            "optimizer": self.parallel.optimizer_state_dict(self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            # The data position is the step (data.batch_indices is a pure function of it).
            "data": {"step": self.step, "seed": self.config.seed, "world_size": self.world_size},
        }

    def save_checkpoint(self) -> Path:
        """Write the checkpoint. Distributed: every rank must call it (the weights and optimizer
        state are gathered), rank 0 alone writes."""
        if self.out_dir is None or self.tokenizer is None:
            raise ValueError("save_checkpoint needs out_dir and tokenizer")
        model = self.parallel.checkpoint_model(lambda: MTPModel(self.model.cfg))
        state = self.state_dict()
        if self.rank != 0:
            self.last_checkpoint = self.out_dir / CHECKPOINT
            return self.last_checkpoint
        self.last_checkpoint = save_checkpoint(
            self.out_dir, model, self.tokenizer, train_config=self.config.to_dict(),
            trainer_state=state, eval_metrics=self.last_eval)
        return self.last_checkpoint

    def shutdown(self, finished: bool = False) -> None:
        """``close()``, then leave the process group this trainer joined (no-op in one process).
        ``finished``: every rank got here after a completed run, so they first meet at a barrier:
        a rank that tears its gloo threads down while a peer's last collective is in flight
        aborted now and then ("terminate called without an active exception"). After an error
        there is no barrier (the other ranks may never arrive)."""
        self.close()
        if self._owns_process_group:
            from multitoken.training.distributed import barrier, destroy

            if finished:
                barrier()
            destroy()
            self._owns_process_group = False

    def load_checkpoint(self, ckpt: str | os.PathLike) -> None:
        """Restore weights, optimizer, scheduler, step, RNG from a checkpoint directory."""
        ckpt = Path(ckpt)
        state = load_trainer_state(ckpt)
        self.parallel.load_weights(lambda m: load_weights(m, ckpt / WEIGHTS), lambda: MTPModel(self.model.cfg))
        try:
            self.parallel.load_optimizer_state_dict(self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"optimizer state in {ckpt} does not match the model: {e}") from None
        # The schedule follows the current config (max_steps may have been raised to train longer).
        lam = self._lr_lambda()
        self.scheduler.lr_lambdas = [lam] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [self.config.lr] * len(self.optimizer.param_groups)
        for g in self.optimizer.param_groups:
            g["initial_lr"] = self.config.lr
            g["lr"] = self.config.lr * lam(int(state["step"]))
        self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        set_rng_state(state["rng"])
        self.last_checkpoint = ckpt

    # ------------------------------------------------------------------ the loop
    @property
    def metrics_path(self) -> Path | None:
        return self.out_dir / METRICS if self.out_dir is not None else None

    def close(self) -> None:
        """Release what the trainer holds beyond memory (TensorBoard writer)."""
        self.metrics.close()

    def request_stop(self, signum: int = signal.SIGINT) -> None:
        """Stop after the current step with a checkpoint (what SIGINT does)."""
        self._stop_signal = signum

    def _start_run(self) -> None:
        """Rank 0: the run folder, the metrics log cut back to the current step, TensorBoard."""
        if self.out_dir is None or self.rank != 0:
            return
        claim_run_dir(self.out_dir)  # refuses a folder of the user's
        self.metrics.truncate(self.step)
        if self.config.tensorboard:
            self.metrics.open_tensorboard(self.out_dir / TENSORBOARD, self.step)

    def _after_step(self, m: dict, tok_s: float, last: bool, bar) -> bool:
        """Log, evaluate and checkpoint after a step as the config says; True when stopping."""
        cfg, step = self.config, self.step
        if step % cfg.log_every == 0 or last:
            self.metrics.write({**m, "tokens_per_s": tok_s})
        if self.val_data is not None and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            self.last_eval = self.evaluate()
            self.metrics.write(self.last_eval)
            if self.progress:
                bar.write(f"step {step}: val loss {self.last_eval['loss']:.4f}, head acc "
                          + " ".join(percent(a) for a in self.last_eval["head_accuracy"]))
        stop = self.parallel.any_rank(self._stop_signal is not None)  # all ranks stop after the same step
        # Distributed: every rank takes part in gathering the checkpoint; rank 0 writes.
        if self.out_dir is not None and (self.rank == 0 or self.parallel.collective) and (
                last or stop or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0)):
            self.save_checkpoint()
        return stop

    def fit(self, stop_at: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` (or ``stop_at`` steps, checkpointing there).

        Returns ``{"step", "tokens", "status", "eval", "checkpoint", "kept"}`` with status one of
        ``finished``, ``stopped`` (stop_at reached) or ``interrupted`` (SIGINT/SIGTERM);
        ``signal`` holds the signal number when interrupted; ``kept`` names the files in the
        checkpoint that training did not write (carried over, e.g. a tuned tree.json). Raises :class:`TrainingDiverged`
        on a NaN/inf loss, leaving the last checkpoint as it was."""
        from tqdm import tqdm

        if self.train_data is None:
            raise ValueError("fit() needs training data")
        end = self.total_steps if stop_at is None else min(stop_at, self.total_steps)
        self._start_run()
        self._stop_signal = None
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, unit="step",
                   dynamic_ncols=True, desc="train")
        status = "finished"
        # Throughput of the training steps alone (evaluation and checkpoints excluded),
        # averaged over each logging interval.
        span_time, span_tokens = 0.0, 0
        try:
            with deferred_signals(self.request_stop):
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
                    bar.update(1)
                    bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{tok_s:.0f}", refresh=False)
                    if self.step % self.config.log_every == 0 or self.step == end:
                        span_time, span_tokens = 0.0, 0
                    if self._after_step(m, tok_s, self.step == end, bar):
                        status = "interrupted"
                        break
                else:
                    if self.step < self.total_steps:
                        status = "stopped"
        finally:
            bar.close()
            self.close()
        kept = kept_files(self.last_checkpoint) if self.last_checkpoint is not None and self.rank == 0 else []
        return {"step": self.step, "tokens": self.tokens_seen, "status": status, "eval": self.last_eval,
                "checkpoint": self.last_checkpoint, "signal": self._stop_signal, "kept": kept}
