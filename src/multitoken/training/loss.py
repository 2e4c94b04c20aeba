"""MTP loss with weighting presets, and the memory-efficient MTP backward (Gloeckle et al.).

The total loss is linear in the per-head mean cross-entropies CE_i:
    loss = sum_i c_i * CE_i
with coefficients c_i fixed by the preset. That linearity is what lets the memory-
efficient step backpropagate one head at a time and still get the naive gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.errors import MultitokenError
from multitoken.model.targets import IGNORE_INDEX, shift_targets

WEIGHTINGS = ("tutorial", "uniform", "deepseek")
DEFAULT_AUX_WEIGHT = {"tutorial": 0.1, "uniform": 1.0, "deepseek": 0.3}


def head_statistics(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor, Tensor]:
    """One head's sums: logits (..., V), targets (...) -> (summed CE, valid count, correct top-1 count).

    Targets equal to ``ignore_index`` are left out of all three."""
    logits, targets = logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)  # (M, V), (M,)
    ce_sum = F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")
    valid = targets != ignore_index
    correct = ((logits.argmax(-1) == targets) & valid).sum()
    return ce_sum, valid.sum(), correct


def head_means(ce_sums: Tensor, counts: Tensor, correct: Tensor,
               totals: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-head means from per-head sums (n,): (head_losses, head_accuracy).

    head_losses = CE sum / counted targets; head_accuracy = correct / ``totals`` (default the
    same counts; head training counts targets outside its draft vocabulary as misses). A head
    with nothing counted gets 0, never NaN."""
    head_losses = ce_sums / counts.clamp(min=1)
    totals = counts if totals is None else totals
    return head_losses, correct.to(head_losses.dtype) / totals.clamp(min=1)


class MTPLoss(nn.Module):
    """Combine per-head cross-entropies into ``loss``, ``primary`` and ``auxiliary``.

    Presets (head 0 = next token, ``primary`` = CE_0):
      * ``tutorial``: auxiliary = mean_{i>=1} CE_i / (i+1); loss = primary + 0.1 * auxiliary
      * ``uniform`` (Gloeckle et al.): auxiliary = sum_{i>=1} CE_i; loss = sum_i CE_i
      * ``deepseek`` (DeepSeek-V3): auxiliary = mean_{i>=1} CE_i; loss = primary + λ * auxiliary, λ = 0.3
    ``aux_weight`` overrides λ; ``head_weights`` (n_future floats) overrides the per-head
    weights (entry 0 scales the primary loss). Means are over non-ignored targets; a head
    with no valid target contributes 0 (never NaN).
    """

    def __init__(self, n_future: int, weighting: str = "tutorial", aux_weight: float | None = None,
                 head_weights: list[float] | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if n_future < 1:
            raise MultitokenError(f"invalid loss: n_future={n_future}; allowed: an integer >= 1")
        if weighting not in WEIGHTINGS:
            raise MultitokenError(f"invalid loss: weighting={weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
        if head_weights is not None and len(head_weights) != n_future:
            raise MultitokenError(f"invalid loss: head_weights has {len(head_weights)} entries; allowed: n_future={n_future}")
        self.n_future, self.weighting, self.ignore_index = n_future, weighting, ignore_index
        self.aux_weight = DEFAULT_AUX_WEIGHT[weighting] if aux_weight is None else float(aux_weight)
        if head_weights is None:
            head_weights = [1.0] + [1.0 / (i + 1) if weighting == "tutorial" else 1.0 for i in range(1, n_future)]
        self.head_weights = [float(w) for w in head_weights]
        # auxiliary = aux_norm * sum_{i>=1} w_i CE_i
        self.aux_norm = 1.0 if weighting == "uniform" or n_future == 1 else 1.0 / (n_future - 1)

    def coefficients(self) -> list[float]:
        """c_i with loss = sum_i c_i * CE_i."""
        return [self.head_weights[0]] + [self.aux_weight * self.aux_norm * w for w in self.head_weights[1:]]

    def targets(self, tokens: Tensor, doc_ids: Tensor | None = None) -> list[Tensor]:
        """Per-head targets, each (B, T) (see ``shift_targets``). The seed's prepare_multi_targets."""
        return [shift_targets(tokens, i, self.ignore_index, doc_ids) for i in range(self.n_future)]

    def head_statistics(self, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """logits (..., V), targets (...) -> (summed CE, valid count, correct top-1 count)."""
        return head_statistics(logits, targets, self.ignore_index)

    def combine(self, ce_sums: Tensor, counts: Tensor, correct: Tensor) -> dict[str, Tensor]:
        """Per-head sums/counts (n,) -> the loss dict."""
        head_losses, head_accuracy = head_means(ce_sums, counts, correct)
        coeffs = torch.tensor(self.coefficients(), dtype=head_losses.dtype, device=head_losses.device)
        aux = self.aux_norm * (head_losses[1:] * torch.tensor(self.head_weights[1:], dtype=head_losses.dtype,
                                                              device=head_losses.device)).sum()
        return {
            "loss": (coeffs * head_losses).sum(),
            "primary": head_losses[0],
            "auxiliary": aux,
            "head_losses": head_losses,
            "head_accuracy": head_accuracy,
            "head_counts": counts,
        }

    def forward(self, logits: Tensor, tokens: Tensor, doc_ids: Tensor | None = None) -> dict[str, Tensor]:
        """logits (B, T, n_future, V), tokens (B, T) -> dict of loss terms (see class doc)."""
        if logits.shape[2] != self.n_future:
            raise ValueError(f"logits have {logits.shape[2]} heads, loss expects n_future={self.n_future}")
        # unbind, not logits[:, :, i]: indexing makes every head's backward allocate a zeroed (B, T, n, V)
        stats = [self.head_statistics(lg, t) for lg, t in zip(logits.unbind(2), self.targets(tokens, doc_ids))]
        ce, n, c = (torch.stack(x) for x in zip(*stats))
        return self.combine(ce, n, c)


def naive_backward(model, loss_fn: MTPLoss, tokens: Tensor, doc_ids: Tensor | None = None,
                   scale: float = 1.0) -> dict[str, Tensor]:
    """Reference step: materialise all n_future logits (B, T, n, V), then one backward."""
    out = loss_fn(model(tokens), tokens, doc_ids)
    (out["loss"] * scale).backward()
    return {k: v.detach() for k, v in out.items()}


def mtp_backward(model, loss_fn: MTPLoss, tokens: Tensor, doc_ids: Tensor | None = None,
                 scale: float = 1.0, chunk_size: int | None = None) -> dict[str, Tensor]:
    """Memory-efficient MTP backward: gradients equal ``naive_backward``'s.

    Runs trunk and heads once up to their pre-unembedding hiddens g_i (B, T, d), detaches
    them, then for each head (and each chunk of ``chunk_size`` positions) computes logits,
    CE and backward into g_i.grad, freeing the logits before the next head: peak logit
    memory is O(B·chunk·V) instead of O(n·B·T·V). Finally one backward pushes the
    accumulated g_i.grad through heads and trunk. ``scale`` multiplies the loss
    (gradient accumulation). Returns the detached loss dict.
    """
    hiddens = model.head_hiddens(tokens)
    targets = loss_fn.targets(tokens, doc_ids)
    counts = torch.stack([(t != loss_fn.ignore_index).sum() for t in targets])
    coeffs = loss_fn.coefficients()
    chunk = chunk_size or tokens.shape[1]
    ce_sums, correct, detached = [], [], []
    for i, (g, target) in enumerate(zip(hiddens, targets)):
        g_leaf = g.detach().requires_grad_(g.requires_grad)
        weight = scale * coeffs[i] / counts[i].clamp(min=1)  # d loss / d (summed CE_i)
        ce_total, correct_total = g.new_zeros((), dtype=torch.float32), counts.new_zeros(())
        for start in range(0, tokens.shape[1], chunk):
            logits = model.head_logits(i, g_leaf[:, start:start + chunk])  # (B, chunk, V)
            ce, _, right = loss_fn.head_statistics(logits, target[:, start:start + chunk])
            del logits  # autograd keeps what CE needs; our reference would be one more (B, chunk, V) at peak
            if ce.requires_grad:
                (ce * weight).backward()
            ce_total, correct_total = ce_total + ce.detach(), correct_total + right
        ce_sums.append(ce_total)
        correct.append(correct_total)
        detached.append((g, g_leaf))
    roots = [(g, leaf.grad) for g, leaf in detached if g.requires_grad and leaf.grad is not None]
    if roots:
        torch.autograd.backward([g for g, _ in roots], [grad for _, grad in roots])
    return loss_fn.combine(torch.stack(ce_sums), counts, torch.stack(correct))
