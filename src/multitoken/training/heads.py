"""Head training on a frozen Hugging Face causal LM, from a memory-mapped hidden-state cache.

Pipeline (``multitoken heads train``)::

    training_texts(data)          -> text stream (stdlib train split, optional prose, user files)
    pretrained.build_hidden_cache -> tokens / base greedy tokens / final-norm hidden states on disk
    draft_vocab_from_cache        -> the N most frequent base-greedy tokens (optional draft vocabulary)
    train_heads(...)              -> AdamW + cosine over the cache for many epochs, metrics.jsonl,
                                     heads.safetensors + heads_config.json (draft vocab ids included)

The base never runs during training: every step reads cached hidden states, so one base
forward per token (the expensive part on a CPU) is paid once and reused for every epoch.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.data.prompts import distill_prompts, training_texts

# ----------------------------------------------------------------------------- draft vocabulary

IGNORE = -100
TARGETS = ("corpus", "distill")


class HeadsTrainError(ValueError):
    """Bad head-training input; the message is one line for the CLI (exit 2)."""


def draft_vocab_from_counts(counts: np.ndarray, size: int, always: Sequence[int] = ()) -> np.ndarray:
    """The ``size`` most frequent token ids (ties by lower id), ``always`` ids included, sorted."""
    counts = np.asarray(counts, dtype=np.int64).copy()
    for t in always:
        if t is not None and 0 <= t < len(counts):
            counts[t] = np.iinfo(np.int64).max  # forced in
    size = min(size, len(counts))
    order = np.lexsort((np.arange(len(counts)), -counts))  # by count desc, then id asc
    return np.sort(order[:size]).astype(np.int64)


def draft_vocab_from_cache(cache, size: int, rows: np.ndarray | None = None,
                           always: Sequence[int] = ()) -> tuple[np.ndarray, float]:
    """(ids, coverage): the ``size`` most frequent base-greedy tokens of the cache ``rows``, and
    the fraction of those rows' greedy tokens that the ids cover."""
    greedy = np.asarray(cache.greedy)
    if rows is not None:
        T = cache.seq_len
        greedy = greedy.reshape(-1, T)[np.asarray(rows)].reshape(-1)
    counts = np.bincount(greedy.astype(np.int64), minlength=cache.vocab_size)
    ids = draft_vocab_from_counts(counts, size, always)
    return ids, float(counts[ids].sum() / max(1, counts.sum()))


def vocab_index(ids: Tensor, vocab_size: int) -> Tensor:
    """(V,) long: full-vocabulary id -> its draft index, IGNORE for ids outside the draft vocab."""
    index = torch.full((vocab_size,), IGNORE, dtype=torch.long)
    index[ids.cpu()] = torch.arange(len(ids))
    return index


# ----------------------------------------------------------------------------- targets

def head_targets(tokens: Tensor, greedy: Tensor, n_future: int, mode: str) -> list[Tensor]:
    """Targets of heads 0..n-1, each (B, T) long with IGNORE past the row's end.

    corpus: head i at t -> tokens[t+i+1] (the text); distill: head i at t -> greedy[t+i], the
    base's own greedy token after the context x[..t+i] (what verification compares drafts with).
    """
    if mode not in TARGETS:
        raise HeadsTrainError(f"unknown targets {mode!r}; allowed: {', '.join(TARGETS)}")
    src, shift = (tokens, 1) if mode == "corpus" else (greedy, 0)
    T = tokens.shape[1]
    out = []
    for i in range(n_future):
        s = i + shift
        t = torch.full_like(src, IGNORE)
        if s < T:
            t[:, :T - s] = src[:, s:]
        out.append(t)
    return out


# ----------------------------------------------------------------------------- config

@dataclass
class HeadsTrainConfig:
    n_future: int = 4  # heads including the base's own head 0 (n-1 draft heads)
    head_type: str = "sequential"  # sequential | residual | linear
    targets: str = "distill"  # corpus: the text's next tokens; distill: the base's greedy tokens
    draft_vocab: int = 8192  # heads' logits over the N most frequent base-greedy tokens; 0 = full vocabulary
    epochs: float = 4.0  # passes over the cached training rows (ignored when steps is set)
    steps: int | None = None  # optimizer steps (overrides epochs)
    batch_size: int = 8  # cached rows (of seq_len tokens) per step
    lr: float = 1e-3  # peak AdamW learning rate
    final_lr_ratio: float = 0.1  # cosine decays to lr * this
    warmup: int = 20  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decay on matrices
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    val_rows: float = 0.04  # fraction of cached rows held out for validation (at least 1 row)
    eval_every: int = 50  # eval row every this many steps (and at the end)
    log_every: int = 10  # metrics row every this many steps (and at the end)
    eval_rows: int = 16  # validation rows scored per eval
    seed: int = 0
    d_ff: int | None = None  # head MLP width (default: the base's)
    tree_budget: int = 8  # nodes of the static tree saved as tree.json (from validation top-k hits); 0 = none
    max_minutes: float | None = None  # training wall-time budget: without steps, the cosine runs over
    # elapsed time and training ends when the budget is spent (at most epochs passes); with steps, a hard stop

    def __post_init__(self) -> None:
        if self.n_future < 2:
            raise HeadsTrainError(f"n_future must be >= 2 to train draft heads, got {self.n_future}")
        from multitoken.hf.wrapper import HF_HEAD_TYPES
        if self.head_type not in HF_HEAD_TYPES:
            raise HeadsTrainError(f"unknown head type {self.head_type!r}; allowed: {', '.join(HF_HEAD_TYPES)}")
        if self.targets not in TARGETS:
            raise HeadsTrainError(f"unknown targets {self.targets!r}; allowed: {', '.join(TARGETS)}")
        if self.draft_vocab < 0:
            raise HeadsTrainError(f"draft_vocab must be >= 0, got {self.draft_vocab}")
        if self.draft_vocab and self.head_type == "linear":
            raise HeadsTrainError("--draft-vocab needs heads that share the base's lm_head (residual, sequential), "
                                  "not linear")
        if self.steps is not None and self.steps < 1:
            raise HeadsTrainError(f"steps must be >= 1, got {self.steps}")
        if self.epochs <= 0 or self.batch_size < 1 or self.lr <= 0:
            raise HeadsTrainError("epochs, batch_size and lr must be positive")
        if not 0 <= self.val_rows < 1:
            raise HeadsTrainError(f"val_rows must be in [0, 1), got {self.val_rows}")


def lr_at(step: int, cfg: HeadsTrainConfig, total: int, progress: float | None = None) -> float:
    """Linear warm-up, then cosine decay to lr * final_lr_ratio at the last step.

    ``progress`` in [0, 1] replaces the step-based position after warm-up (time-budgeted runs
    decay over elapsed time, so the schedule ends when the budget does)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if progress is None:
        progress = (step - cfg.warmup) / max(1, total - cfg.warmup - 1)
    progress = min(1.0, max(0.0, progress))
    return cfg.lr * (cfg.final_lr_ratio + (1 - cfg.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------- the step

def _unembed_weight(model, i: int) -> Tensor:
    """(V, d) output matrix of head i (the shared lm_head unless the heads have their own)."""
    if i > 0 and model.heads.out is not None:
        return model.heads.out[i - 1].weight
    return model.lm_head.weight


def head_statistics(model, hidden: Tensor, tokens: Tensor, greedy: Tensor, targets_mode: str,
                    draft_ids: Tensor | None, index: Tensor | None, grad: bool = True) -> dict[str, Any]:
    """Per-head CE sums (over the draft vocabulary when given) and top-1 hits for a batch.

    hidden (B, T, d) cached base hidden states; tokens, greedy (B, T). Head 0 is the base head:
    reported, and trained only when base layers are (``model.adaptation``), where its CE keeps the
    adapted base close to the original's greedy tokens. With a draft vocabulary, targets outside it
    are left out of the CE (no draft can produce them) but count as misses in the accuracy.
    Returns ``ce`` (list of n scalar tensors, differentiable for trained heads when ``grad``),
    ``count`` (targets in the CE per head) and ``correct`` ((hits, valid targets) per head).
    """
    targets = head_targets(tokens, greedy, model.n_future, targets_mode)
    with torch.set_grad_enabled(grad):
        gs = model.head_hiddens_from(hidden, tokens)  # n x (B, T, d)
    ce, count, correct = [], [], []
    for i, (g, t) in enumerate(zip(gs, targets)):
        with torch.set_grad_enabled(grad and (i > 0 or model.trains_base)):
            valid = t != IGNORE
            g, t = g[valid], t[valid]  # (M, d), (M,)
            W = _unembed_weight(model, i)
            if draft_ids is not None and not (i == 0 and model.trains_base):  # a trained base head: full V
                logits = g @ W[draft_ids].T  # (M, N): only the draft vocabulary's rows
                dt = index[t]  # draft index, IGNORE outside the draft vocabulary
                pred = draft_ids[logits.argmax(-1)]
            else:
                logits = g @ W.T  # (M, V)
                dt, pred = t, logits.argmax(-1)
            ce.append(F.cross_entropy(logits.float(), dt, ignore_index=IGNORE, reduction="sum"))
        count.append(int((dt != IGNORE).sum()))
        correct.append((int((pred == t).sum()), int(t.numel())))
    return {"ce": ce, "count": count, "correct": correct}


def _combine(ce: list, count: list, correct: list) -> dict[str, Any]:
    """Means from sums: loss (sum of draft-head CEs), primary, auxiliary, per-head lists."""
    head_losses = [float(c) / max(n, 1) for c, n in zip(ce, count)]
    head_accuracy = [r / max(v, 1) for r, v in correct]
    aux = head_losses[1:]
    return {"loss": sum(aux), "primary": head_losses[0], "auxiliary": sum(aux) / max(len(aux), 1),
            "head_losses": head_losses, "head_accuracy": head_accuracy}


def expected_tau(acc: Sequence[float]) -> float:
    """1 + sum_j prod_{i<=j} acc_i: chain tau if head accuracies were the acceptance rates."""
    tau, p = 1.0, 1.0
    for a in acc:
        p *= a
        tau += p
    return tau


# ----------------------------------------------------------------------------- training loop

def split_rows(n_rows: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows): a fixed random ``val_fraction`` of the cache rows (>= 1 if > 0)."""
    order = np.random.default_rng(seed + 12345).permutation(n_rows)
    n_val = 0 if val_fraction == 0 or n_rows < 2 else max(1, int(round(n_rows * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def evaluate_heads(model, cache, rows: np.ndarray, cfg: HeadsTrainConfig, draft_ids, index) -> dict[str, Any] | None:
    """Validation loss / accuracy per head over a fixed set of cached rows."""
    if len(rows) == 0:
        return None
    rows = rows[:cfg.eval_rows]
    was = model.training
    model.eval()
    ce = [0.0] * model.n_future
    count = [0] * model.n_future
    correct = [(0, 0)] * model.n_future
    for i in range(0, len(rows), cfg.batch_size):
        h, x, gr = cache.get(rows[i:i + cfg.batch_size])
        s = head_statistics(model, h, x, gr, cfg.targets, draft_ids, index, grad=False)
        ce = [a + float(b) for a, b in zip(ce, s["ce"])]
        count = [a + b for a, b in zip(count, s["count"])]
        correct = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(correct, s["correct"])]
    model.train(was)
    out = _combine(ce, count, correct)
    return {"split": "val", **out, "expected_tau": expected_tau(out["head_accuracy"][1:]),
            "val_tokens": correct[0][1]}


@torch.no_grad()
def topk_hits(model, cache, rows: np.ndarray, cfg: HeadsTrainConfig, draft_ids, top_k: int = 5) -> np.ndarray:
    """(n-1, top_k): P(rank r of draft head j equals its target) on validation rows, teacher-forced
    (the table :func:`multitoken.decoding.tree.build_tree` turns into a static tree)."""
    hits = np.zeros((model.n_future - 1, top_k))
    total = np.zeros(model.n_future - 1)
    was = model.training
    model.eval()
    for i in range(0, len(rows), cfg.batch_size):
        h, x, gr = cache.get(rows[i:i + cfg.batch_size])
        targets = head_targets(x, gr, model.n_future, cfg.targets)
        gs = model.head_hiddens_from(h, x)
        for j in range(1, model.n_future):
            valid = targets[j] != IGNORE
            g, t = gs[j][valid], targets[j][valid]
            W = _unembed_weight(model, j)
            if draft_ids is not None:
                ranks = draft_ids[(g @ W[draft_ids].T).topk(top_k, -1).indices]
            else:
                ranks = (g @ W.T).topk(top_k, -1).indices
            hits[j - 1] += (ranks == t[:, None]).sum(0).numpy()
            total[j - 1] += len(t)
    model.train(was)
    return hits / np.maximum(total, 1)[:, None]


def train_heads(model, cache, cfg: HeadsTrainConfig, out_dir: str | os.PathLike | None = None,
                progress: bool = True, extra_meta: dict | None = None) -> dict[str, Any]:
    """Train ``model.heads`` (an :class:`MTPHeadsForCausalLM`) on a :class:`HiddenCache`.

    AdamW with warm-up + cosine over ``cfg.steps`` (or ``cfg.epochs`` passes over the training
    rows); every ``log_every`` steps a metrics row (the ``multitoken train`` format) and every
    ``eval_every`` a validation row go to ``out_dir/metrics.jsonl``; the heads (and the draft
    vocabulary ids) are saved to ``out_dir`` at the end. Returns a summary dict.
    """
    from tqdm import tqdm

    if cache.vocab_size != model.vocab_size or cache.d_model != model.cfg.d_model:
        raise HeadsTrainError(f"hidden cache {cache.path} is for vocab_size={cache.vocab_size}, "
                              f"d_model={cache.d_model}; the base has {model.vocab_size}, {model.cfg.d_model}")
    if cache.layer != model.cache_layer:
        raise HeadsTrainError(f"hidden cache {cache.path} holds hidden states of layer "
                              f"{'final' if cache.layer is None else cache.layer}; training these heads needs "
                              f"{'final' if model.cache_layer is None else model.cache_layer} (another --cache folder)")
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
    steps_per_epoch = max(1, len(train_rows) // cfg.batch_size)
    total = cfg.steps or max(1, int(round(cfg.epochs * steps_per_epoch)))
    params = [p for p in model.heads.parameters() if p.requires_grad]
    params += [p for p in model.base.parameters() if p.requires_grad]  # trained base layers, if any
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    out = Path(out_dir) if out_dir is not None else None
    metrics = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics = open(out / "metrics.jsonl", "w")

    def log(row: dict) -> None:
        if metrics is not None:
            metrics.write(json.dumps(row) + "\n")
            metrics.flush()

    model.train()
    model.base.eval()
    rng = np.random.default_rng(cfg.seed)
    order: list[int] = []
    tokens_seen, span_t, span_tok = 0, 0.0, 0
    start = time.perf_counter()
    last_eval = first_eval = None
    status = "finished"
    warm_s = 0.0
    bar = tqdm(total=total, disable=not progress, unit="step", dynamic_ncols=True, desc="heads train")
    try:
        first_eval = evaluate_heads(model, cache, val_rows, cfg, draft_ids, index)
        if first_eval:
            log({**first_eval, "step": 0, "tokens": 0})
        start = time.perf_counter()  # the budget counts training (and its evals), not the first eval
        for step in range(total):
            t0 = time.perf_counter()
            if len(order) < cfg.batch_size:
                order += rng.permutation(train_rows).tolist()
            batch, order = order[:cfg.batch_size], order[cfg.batch_size:]
            elapsed = time.perf_counter() - start
            timed = cfg.max_minutes is not None and cfg.steps is None
            if timed and step == cfg.warmup:
                warm_s = elapsed  # the budget's decay phase starts after warm-up
            lr = lr_at(step, cfg, total, (elapsed - warm_s) / max(1e-9, 60 * cfg.max_minutes - warm_s)
                       if timed and step >= cfg.warmup else None)
            for group in opt.param_groups:
                group["lr"] = lr
            h, x, gr = cache.get(np.sort(batch))
            s = head_statistics(model, h, x, gr, cfg.targets, draft_ids, index)
            trained = slice(0 if model.trains_base else 1, None)
            loss = sum(c / max(n, 1) for c, n in zip(s["ce"][trained], s["count"][trained]))
            if not torch.isfinite(loss):
                raise HeadsTrainError(f"loss is {float(loss)} at step {step + 1}; training stopped "
                                      "(try a lower --lr)")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            n_tok = x.numel()
            tokens_seen += n_tok
            span_t += time.perf_counter() - t0
            span_tok += n_tok
            m = _combine([float(c.detach()) for c in s["ce"]], s["count"], s["correct"])
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.3f}", acc1=f"{m['head_accuracy'][1]:.2f}",
                            tok_s=f"{span_tok / max(span_t, 1e-9):.0f}", refresh=False)
            done = step + 1
            timed_out = cfg.max_minutes is not None and time.perf_counter() - start > 60 * cfg.max_minutes
            last = done == total or timed_out
            if done % cfg.log_every == 0 or last:
                log({"step": done, "tokens": tokens_seen, "lr": lr, **m, "tokens_per_s": span_tok / max(span_t, 1e-9)})
                span_t, span_tok = 0.0, 0
            if (cfg.eval_every and done % cfg.eval_every == 0) or last:
                last_eval = evaluate_heads(model, cache, val_rows, cfg, draft_ids, index)
                if last_eval:
                    log({**last_eval, "step": done, "tokens": tokens_seen})
                    if progress:
                        bar.write(f"step {done}: val loss {last_eval['loss']:.3f}, head acc "
                                  + " ".join(f"{a:.1%}" for a in last_eval["head_accuracy"][1:])
                                  + f", expected tau {last_eval['expected_tau']:.2f}")
                if out is not None and not last:  # a killed run keeps its last evaluated heads
                    model.save_heads(out, extra={"training": {"status": "in progress", "steps": done,
                                                              "tokens": tokens_seen, **(extra_meta or {})}})
            if timed_out:
                status = "finished (time budget)" if timed else "stopped (max_minutes)"
                break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    wall = time.perf_counter() - start
    summary = {"status": status, "steps": done, "planned_steps": total, "tokens": tokens_seen,
               "epochs": tokens_seen / max(1, len(train_rows) * cache.seq_len),
               "train_rows": int(len(train_rows)), "val_rows": int(len(val_rows)), "seq_len": cache.seq_len,
               "unique_train_tokens": int(len(train_rows) * cache.seq_len), "wall_s": wall,
               "draft_vocab": int(cfg.draft_vocab), "draft_vocab_coverage": coverage,
               "config": asdict(cfg), "first_eval": first_eval, "eval": last_eval}
    if out is not None:
        model.save_heads(out, extra={"training": {**summary, **(extra_meta or {})}})
        if cfg.tree_budget and len(val_rows):
            from multitoken.decoding.tree import build_tree, expected_accept_length, save_tree
            acc = topk_hits(model, cache, val_rows[:cfg.eval_rows], cfg, draft_ids)
            paths = build_tree(acc, cfg.tree_budget)
            save_tree(paths, out, acceptance=acc.tolist(), budget=cfg.tree_budget, source="validation top-k (heads train)")
            summary["tree"] = {"paths": paths, "expected_tau": expected_accept_length(paths, acc),
                               "topk_acceptance": acc.tolist()}
    return summary


# ----------------------------------------------------------------------------- self-distillation data

@torch.inference_mode()
def generate_distill_texts(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int = 128,
                           batch_size: int = 32, progress: bool = True) -> list[str]:
    """The base's own greedy answers to ``prompts`` (prompt + answer, up to and including EOS),
    stopping once about ``n_tokens`` answer tokens are made.

    Teacher-forcing these texts later gives the heads the inputs decoding feeds them (accepted
    tokens are the base's greedy tokens), which is what decides acceptance. Prompts run in
    batches of similar length, left-padded; batched and single-prompt greedy answers can differ
    in rare near-ties, which does not matter for training data.
    """
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str] = []
    bar = tqdm(total=n_tokens, unit="tok", desc="self-distillation", disable=not progress)
    made = 0
    for start in range(0, len(encoded), batch_size):
        if made >= n_tokens:
            break
        batch = sorted(encoded[start:start + batch_size], key=len)
        width = len(batch[-1])
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        y = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for prompt, answer in zip(batch, y):
            answer = answer[:answer.index(eos) + 1] if eos in answer else answer
            made += len(answer)
            out.append(tokenizer.decode(prompt + answer, skip_special_tokens=False))
        bar.update(min(made, n_tokens) - bar.n)
    bar.close()
    return out


# ----------------------------------------------------------------------------- the command

def run_heads_train(base: str, data: Sequence[str] | None, out_dir: str | os.PathLike, cfg: HeadsTrainConfig,
                    cache_dir: str | os.PathLike | None = None, max_tokens: int = 65536, seq_len: int = 256,
                    generate_distill: int = 0, dtype: str = "float32", threads: int | None = None,
                    progress: bool = True, train_base_layers: int = 0, lora_rank: int = 0) -> dict[str, Any]:
    """``multitoken heads train``: hidden cache (built or reused), then :func:`train_heads`.
    With ``train_base_layers`` the cache holds the input of the first trained layer."""
    from multitoken.hf.adapt import cache_layer
    from multitoken.hf.wrapper import MTPHeadsForCausalLM, load_base
    from multitoken.hf.loading import HiddenCache, build_hidden_cache, model_identity

    if threads:
        torch.set_num_threads(threads)
    if max_tokens < seq_len:
        raise HeadsTrainError(f"--max-tokens {max_tokens} is less than one sequence of {seq_len} tokens")
    out = Path(out_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_base(base, dtype)
    model.eval()
    identity = model_identity(model, tokenizer)
    load_s = time.perf_counter() - t0
    cache_path = Path(cache_dir) if cache_dir else out / "hidden_cache"
    t1 = time.perf_counter()
    if (cache_path / "meta.json").is_file():
        cache = HiddenCache(cache_path)  # reuse, whatever texts built it, once it is this model's
        cache.check_model(model, tokenizer)
        reused = True
    else:
        texts: Iterable[str] = training_texts(data)
        if generate_distill:
            texts = list(texts)
            prompts = distill_prompts(tokenizer, texts[::7], max(8, generate_distill // 64))
            gen = generate_distill_texts(model, tokenizer, prompts, generate_distill, progress=progress)
            texts = gen + texts
        cache = build_hidden_cache(model, tokenizer, texts, cache_path, seq_len=seq_len, max_tokens=max_tokens,
                                   progress=progress, layer=cache_layer(model, train_base_layers))
        reused = False
    cache_s = time.perf_counter() - t1
    heads = MTPHeadsForCausalLM(model, cfg.n_future, cfg.head_type, d_ff=cfg.d_ff, identity=identity,
                                train_base_layers=train_base_layers, lora_rank=lora_rank)
    summary = train_heads(heads, cache, cfg, out, progress=progress,
                          extra_meta={"cache": str(cache_path), "cache_tokens": int(cache.meta["count"]),
                                      "cache_build_s": None if reused else cache_s, "base": base})
    summary.update(load_s=load_s, cache_s=cache_s, cache_reused=reused, cache_tokens=int(cache.meta["count"]),
                   out=str(out))
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
