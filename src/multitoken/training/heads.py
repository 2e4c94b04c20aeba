"""Head training on a frozen Hugging Face causal LM, from a memory-mapped hidden-state cache.

Pipeline (``multitoken heads train``, :func:`multitoken.training.heads_run.run_heads_train`)::

    training_texts(data)          -> text stream (stdlib train split, optional prose, user files)
    hf.build_hidden_cache         -> tokens / base greedy tokens / final-norm hidden states on disk
    draft_vocab_from_cache        -> the N most frequent base-greedy tokens (optional draft vocabulary)
    train_heads(...)              -> AdamW + cosine over the cache for many epochs, metrics.jsonl,
                                     heads.safetensors + heads_config.json (draft vocab ids included)

The base never runs during training: every step reads cached hidden states, so one base
forward per token (the expensive part on a CPU) is paid once and reused for every epoch. The
schedule, parameter groups, target shift and per-head statistics are the trainer's
(``schedule.py``, ``model.targets``, ``loss.py``).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from multitoken.io import atomic_write
from multitoken.training.draft_vocab import draft_vocab_from_cache, vocab_index
from multitoken.training.head_stats import combine_heads, evaluate_heads, head_statistics, split_rows, topk_hits
from multitoken.training.heads_config import HeadsTrainConfig, HeadsTrainError
from multitoken.training.metrics import METRICS, MetricsLog
from multitoken.training.schedule import lr_factor, param_groups


def check_cache(model, cache, cfg: HeadsTrainConfig) -> None:
    """The cache must hold hidden states of this base, at the layer these heads read (the final
    layer for soft targets)."""
    if cache.vocab_size != model.vocab_size or cache.d_model != model.cfg.d_model:
        raise HeadsTrainError(f"hidden cache {cache.path} is for vocab_size={cache.vocab_size}, "
                              f"d_model={cache.d_model}; the base has {model.vocab_size}, {model.cfg.d_model}")
    if cfg.soft_targets and (cache.layer is not None or model.trains_base or cfg.targets != "distill"):
        raise HeadsTrainError("--soft-targets needs distill targets and a final-layer cache of a frozen base "
                              "(the base's distribution is read off the cached final hidden states)")
    if cache.layer != model.cache_layer:
        raise HeadsTrainError(f"hidden cache {cache.path} holds hidden states of layer "
                              f"{'final' if cache.layer is None else cache.layer}; training these heads needs "
                              f"{'final' if model.cache_layer is None else model.cache_layer} (another --cache folder)")


class _Schedule:
    """The lr of each step: :func:`lr_factor` over steps, or over elapsed time for a time-budgeted
    run (``max_minutes`` without ``steps``), whose decay phase starts after warm-up."""

    def __init__(self, cfg: HeadsTrainConfig, total: int):
        self.cfg, self.total = cfg, total
        self.timed = cfg.max_minutes is not None and cfg.steps is None
        self.warm_s = 0.0

    def lr(self, step: int, elapsed: float) -> float:
        cfg = self.cfg
        if self.timed and step == cfg.warmup:
            self.warm_s = elapsed
        progress = ((elapsed - self.warm_s) / max(1e-9, 60 * cfg.max_minutes - self.warm_s)
                    if self.timed and step >= cfg.warmup else None)
        return cfg.lr * lr_factor(step, cfg.warmup, self.total, cfg.final_lr_ratio, progress)


def _step(model, opt, params, cache, batch, cfg: HeadsTrainConfig, draft_ids, index, step: int) -> dict:
    """One optimizer step on cached rows ``batch``; the step's statistics."""
    rows = cache.get(np.sort(batch))
    s = head_statistics(model, rows, cfg.targets, draft_ids, index, soft=cfg.soft_targets, prompt_loss=cfg.prompt_loss)
    trained = slice(0 if model.trains_base else 1, None)
    loss = sum(c / max(n, 1) for c, n in zip(s["ce"][trained], s["count"][trained]))
    if not torch.isfinite(loss):
        raise HeadsTrainError(f"loss is {float(loss)} at step {step + 1}; training stopped (try a lower --lr)")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return {**s, "tokens": rows.tokens.numel()}


def _report_eval(bar, done: int, ev: dict) -> None:
    bar.write(f"step {done}: val loss {ev['loss']:.3f}, head acc "
              + " ".join(f"{a:.1%}" for a in ev["head_accuracy"][1:]) + f", expected tau {ev['expected_tau']:.2f}")


def _save_tree(model, cache, val_rows, cfg: HeadsTrainConfig, draft_ids, out: Path) -> dict:
    """The static tree of ``cfg.tree_budget`` nodes from validation top-k hits, saved as tree.json."""
    from multitoken.decoding import build_tree, expected_accept_length, save_tree

    acc = topk_hits(model, cache, val_rows[:cfg.eval_rows], cfg, draft_ids)
    paths = build_tree(acc, cfg.tree_budget)
    save_tree(paths, out, acceptance=acc.tolist(), budget=cfg.tree_budget, source="validation top-k (heads train)")
    return {"paths": paths, "expected_tau": expected_accept_length(paths, acc), "topk_acceptance": acc.tolist()}


def train_heads(model, cache, cfg: HeadsTrainConfig, out_dir: str | os.PathLike | None = None,
                progress: bool = True, extra_meta: dict | None = None) -> dict[str, Any]:
    """Train ``model.heads`` (an :class:`MTPHeadsForCausalLM`) on a :class:`HiddenCache`.

    AdamW with warm-up + cosine over ``cfg.steps`` (or ``cfg.epochs`` passes over the training
    rows); every ``log_every`` steps a metrics row (the ``multitoken train`` format) and every
    ``eval_every`` a validation row go to ``out_dir/metrics.jsonl``; the heads (and the draft
    vocabulary ids) are saved to ``out_dir`` at the end. Returns a summary dict.

    The loop body (logging, evaluation, the time budget, in-progress saves) reads as one piece;
    the step itself, the schedule and the tree are separate helpers.
    """
    from tqdm import tqdm

    check_cache(model, cache, cfg)
    torch.manual_seed(cfg.seed)
    train_rows, val_rows = split_rows(cache.rows, cfg.val_rows, cfg.seed)
    if len(train_rows) == 0:
        raise HeadsTrainError(f"hidden cache {cache.path} has no training rows")
    draft_ids = index = None
    coverage = 1.0
    if cfg.draft_vocab:
        ids, coverage = draft_vocab_from_cache(cache, cfg.draft_vocab, train_rows)
        model.set_draft_vocab(ids)
        draft_ids = model.draft_ids
        index = vocab_index(draft_ids, model.vocab_size).to(draft_ids.device)
    total = cfg.steps or max(1, int(round(cfg.epochs * max(1, len(train_rows) // cfg.batch_size))))
    groups = param_groups([model.heads, model.base], cfg.weight_decay)  # trained base layers, if any
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / METRICS, "")  # a new run: an empty log
    log = MetricsLog(out / METRICS if out is not None else None)
    model.train()
    model.base.eval()
    rng = np.random.default_rng(cfg.seed)
    schedule = _Schedule(cfg, total)
    order: list[int] = []
    tokens_seen, span_t, span_tok, done = 0, 0.0, 0, 0
    last_eval = None
    status = "finished"
    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True, desc="heads train")
    try:
        first_eval = evaluate_heads(model, cache, val_rows, cfg, draft_ids, index)
        if first_eval:
            log.write({**first_eval, "step": 0, "tokens": 0})
        start = time.perf_counter()  # the budget counts training (and its evals), not the first eval
        for step in range(total):
            t0 = time.perf_counter()
            if len(order) < cfg.batch_size:
                order += rng.permutation(train_rows).tolist()
            batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
            lr = schedule.lr(step, time.perf_counter() - start)
            for group in opt.param_groups:
                group["lr"] = lr
            s = _step(model, opt, params, cache, batch, cfg, draft_ids, index, step)
            tokens_seen += s["tokens"]
            span_t += time.perf_counter() - t0
            span_tok += s["tokens"]
            m = combine_heads([float(c.detach()) for c in s["ce"]], s["count"], s["correct"])
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc1=f"{m['head_accuracy'][1]:.2f}",
                            tok_s=f"{span_tok / max(span_t, 1e-9):.0f}", refresh=False)
            done = step + 1
            timed_out = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
            last = done == total or timed_out
            if done % cfg.log_every == 0 or last:
                log.write({"step": done, "tokens": tokens_seen, "lr": lr, **m,
                           "tokens_per_s": span_tok / max(span_t, 1e-9)})
                span_t, span_tok = 0.0, 0
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                last_eval = evaluate_heads(model, cache, val_rows, cfg, draft_ids, index)
                if last_eval:
                    log.write({**last_eval, "step": done, "tokens": tokens_seen})
                    if progress:
                        _report_eval(bar, done, last_eval)
                if out is not None and not last:  # a killed run keeps its last evaluated heads
                    model.save_heads(out, extra={"training": {"status": "in progress", "steps": done,
                                                              "tokens": tokens_seen, **(extra_meta or {})}})
            if timed_out:
                status = "finished (time budget)" if schedule.timed else "stopped (max_minutes)"
                break
    finally:
        bar.close()
    summary = {"status": status, "steps": done, "planned_steps": total, "tokens": tokens_seen,
               "epochs": tokens_seen / max(1, len(train_rows) * cache.seq_len),
               "train_rows": int(len(train_rows)), "val_rows": int(len(val_rows)), "seq_len": cache.seq_len,
               "unique_train_tokens": int(len(train_rows) * cache.seq_len), "wall_s": time.perf_counter() - start,
               "draft_vocab": int(cfg.draft_vocab), "draft_vocab_coverage": coverage,
               "config": asdict(cfg), "first_eval": first_eval, "eval": last_eval}
    if out is not None:
        model.save_heads(out, extra={"training": {**summary, **(extra_meta or {})}})
        if cfg.tree_budget and len(val_rows):
            summary["tree"] = _save_tree(model, cache, val_rows, cfg, draft_ids, out)
    return summary
