"""What head training measures on cached hidden states: per-head targets, CE sums and top-1 hits
(through :func:`multitoken.training.loss.head_statistics`), validation rows and top-k hit rates."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from multitoken.decoding import expected_chain_tau
from multitoken.hf.doc_packing import PAD, TEXT
from multitoken.model.layers import document_ids
from multitoken.model.targets import IGNORE_INDEX, shift_targets, shift_tokens
from multitoken.training.heads_config import TARGETS, HeadsTrainConfig, HeadsTrainError
from multitoken.training.loss import head_means, head_statistics as ce_statistics


def head_targets(tokens: Tensor, greedy: Tensor, n_future: int, mode: str, positions: Tensor | None = None,
                 trained: Tensor | None = None) -> list[Tensor]:
    """Targets of heads 0..n-1, each (B, T) long with IGNORE_INDEX past the row's end.

    corpus: head i at t -> tokens[t+i+1] (the text, :func:`shift_targets`); distill: head i at
    t -> greedy[t+i], the base's own greedy token after the context x[..t+i] (what verification
    compares drafts with; greedy[t] already predicts t+1, hence one shift less).
    positions (B, T): rows of packed documents; a target in another document than t is ignored.
    trained (B, T) bool: the positions that train (:func:`trained_positions`); the rest are ignored.
    """
    if mode not in TARGETS:
        raise HeadsTrainError(f"unknown targets {mode!r}; allowed: {', '.join(TARGETS)}")
    docs = None if positions is None else document_ids(positions)
    if mode == "corpus":
        targets = [shift_targets(tokens, i, IGNORE_INDEX, docs) for i in range(n_future)]
    else:
        targets = [shift_tokens(greedy, i, IGNORE_INDEX) for i in range(n_future)]
        if docs is not None:
            targets = [t.masked_fill(shift_tokens(docs, i, -1) != docs, IGNORE_INDEX) for i, t in enumerate(targets)]
    return targets if trained is None else [t.masked_fill(~trained, IGNORE_INDEX) for t in targets]


def trained_positions(segments: Tensor, prompt_loss: bool = False) -> Tensor:
    """(B, T) bool: where heads train on cached rows: answers and plain text (:data:`TEXT`), and
    with ``prompt_loss`` the chat prompts too; never the row padding."""
    return segments != PAD if prompt_loss else segments == TEXT


def _rows_targets(rows, n_future: int, mode: str, prompt_loss: bool) -> list[Tensor]:
    """:func:`head_targets` of cached rows (a :class:`~multitoken.hf.hidden_cache.CachedRows`)."""
    return head_targets(rows.tokens, rows.greedy, n_future, mode, rows.positions,
                        trained_positions(rows.segments, prompt_loss))


def unembed_weight(model, i: int) -> Tensor:
    """(V, d) output matrix of head i (the shared lm_head unless the heads have their own)."""
    if i > 0 and model.heads.out is not None:
        return model.heads.out[i - 1].weight
    return model.lm_head.weight


def head_statistics(model, rows, targets_mode: str, draft_ids: Tensor | None, index: Tensor | None,
                    grad: bool = True, soft: float = 0.0, prompt_loss: bool = False) -> dict[str, Any]:
    """Per-head CE sums (over the draft vocabulary when given) and top-1 hits for a batch.

    rows: a :class:`~multitoken.hf.hidden_cache.CachedRows` (cached base hidden states (B, T, d);
    tokens, greedy, positions, segments (B, T)); heads train where :func:`trained_positions` says
    (``prompt_loss``), each document of a row on its own. Head 0 is the base head:
    reported, and trained only when base layers are (``model.adaptation``), where its CE keeps the
    adapted base close to the original's greedy tokens. With a draft vocabulary, targets outside it
    are left out of the CE (no draft can produce them) but count as misses in the accuracy.
    ``soft`` > 0 (distill targets, final-layer cache): a draft head's CE is (1 - soft) x the CE
    of the greedy token + soft x the CE against the base's whole next-token distribution there
    (softmax of the base head on the cached hidden state at t+i, over the draft vocabulary), a
    richer signal per cached token than its argmax alone.
    Returns ``ce`` (list of n scalar tensors, differentiable for trained heads when ``grad``),
    ``count`` (targets in the CE per head) and ``correct`` ((hits, valid targets) per head).
    """
    hidden = rows.hidden
    targets = _rows_targets(rows, model.n_future, targets_mode, prompt_loss)
    with torch.set_grad_enabled(grad):
        gs = model.head_hiddens_from(hidden, rows.tokens, rows.positions)  # n x (B, T, d)
    ce, count, correct = [], [], []
    for i, (g, t) in enumerate(zip(gs, targets)):
        with torch.set_grad_enabled(grad and (i > 0 or model.trains_base)):
            valid = t != IGNORE_INDEX
            g, t = g[valid], t[valid]  # (M, d), (M,)
            W = unembed_weight(model, i)
            rows = draft_ids is not None and not (i == 0 and model.trains_base)  # a trained base head: full V
            W = W[draft_ids] if rows else W  # (N or V, d)
            logits = g @ W.T  # (M, N or V)
            dt = index[t] if rows else t  # draft index, IGNORE_INDEX outside the draft vocabulary
            # A hit in draft space is a hit in the full vocabulary: draft ids map one-to-one.
            ce_sum, n, hits = ce_statistics(logits, dt)
            if soft and i > 0:
                teacher = torch.cat([hidden[:, i:], hidden[:, :i]], 1)[valid]  # (M, d): the base at t+i
                ce_sum = (1 - soft) * ce_sum + soft * soft_ce(logits, (teacher @ W.T).softmax(-1), dt)
        ce.append(ce_sum)
        count.append(int(n))
        correct.append((int(hits), int(t.numel())))
    return {"ce": ce, "count": count, "correct": correct}


def soft_ce(logits: Tensor, probs: Tensor, targets: Tensor) -> Tensor:
    """Summed CE of logits (M, N) against target distributions probs (M, N), over the rows whose
    hard target is not IGNORE_INDEX (the rows the hard CE counts)."""
    keep = targets != IGNORE_INDEX
    return -(probs[keep] * torch.log_softmax(logits[keep].float(), -1)).sum()


def combine_heads(ce: list, count: list, correct: list) -> dict[str, Any]:
    """Means from sums (:func:`~multitoken.training.loss.head_means`): loss (sum of the draft
    heads' CEs), primary (head 0), auxiliary (mean draft-head CE), per-head lists."""
    head_losses, head_accuracy = head_means(
        torch.tensor([float(c) for c in ce], dtype=torch.float64), torch.tensor(count),
        torch.tensor([r for r, _ in correct]), torch.tensor([v for _, v in correct]))
    head_losses, head_accuracy = head_losses.tolist(), head_accuracy.tolist()
    aux = head_losses[1:]
    return {"loss": sum(aux), "primary": head_losses[0], "auxiliary": sum(aux) / max(len(aux), 1),
            "head_losses": head_losses, "head_accuracy": head_accuracy}


def split_rows(n_rows: int, val_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows): a fixed random ``val_fraction`` of the cache rows (>= 1 if > 0)."""
    order = np.random.default_rng(seed + 12345).permutation(n_rows)
    n_val = 0 if val_fraction == 0 or n_rows < 2 else max(1, int(round(n_rows * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def evaluate_heads(model, cache, rows: np.ndarray, cfg: HeadsTrainConfig, draft_ids, index) -> dict[str, Any] | None:
    """Validation loss / accuracy per head over a fixed set of cached rows, and the chain τ the
    draft heads' accuracies would give as acceptance rates."""
    if len(rows) == 0:
        return None
    rows = rows[:cfg.eval_rows]
    was = model.training
    model.eval()
    ce = [0.0] * model.n_future
    count = [0] * model.n_future
    correct = [(0, 0)] * model.n_future
    for i in range(0, len(rows), cfg.batch_size):
        s = head_statistics(model, cache.get(rows[i:i + cfg.batch_size]), cfg.targets, draft_ids, index, grad=False,
                            soft=cfg.soft_targets, prompt_loss=cfg.prompt_loss)
        ce = [a + float(b) for a, b in zip(ce, s["ce"])]
        count = [a + b for a, b in zip(count, s["count"])]
        correct = [(a[0] + b[0], a[1] + b[1]) for a, b in zip(correct, s["correct"])]
    model.train(was)
    out = combine_heads(ce, count, correct)
    return {"split": "val", **out, "expected_tau": expected_chain_tau(out["head_accuracy"][1:]),
            "val_tokens": correct[0][1]}


@torch.no_grad()
def topk_hits(model, cache, rows: np.ndarray, cfg: HeadsTrainConfig, draft_ids, top_k: int = 5) -> np.ndarray:
    """(n-1, top_k): P(rank r of draft head j equals its target) on validation rows, teacher-forced
    (the table :func:`multitoken.decoding.build_tree` turns into a static tree)."""
    hits = np.zeros((model.n_future - 1, top_k))
    total = np.zeros(model.n_future - 1)
    was = model.training
    model.eval()
    for i in range(0, len(rows), cfg.batch_size):
        batch = cache.get(rows[i:i + cfg.batch_size])
        targets = _rows_targets(batch, model.n_future, cfg.targets, cfg.prompt_loss)
        gs = model.head_hiddens_from(batch.hidden, batch.tokens, batch.positions)
        for j in range(1, model.n_future):
            valid = targets[j] != IGNORE_INDEX
            g, t = gs[j][valid], targets[j][valid]
            W = unembed_weight(model, j)
            if draft_ids is not None:
                ranks = draft_ids[(g @ W[draft_ids].T).topk(top_k, -1).indices]  # (M, top_k) full ids
            else:
                ranks = (g @ W.T).topk(top_k, -1).indices
            hits[j - 1] += (ranks == t[:, None]).sum(0).numpy()
            total[j - 1] += len(t)
    model.train(was)
    return hits / np.maximum(total, 1)[:, None]
