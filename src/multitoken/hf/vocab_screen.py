"""The base head's argmax, exact, for half the bytes: a bfloat16 screen, then float32 where it matters.

Every decoding pass ends in the vocabulary head: logits = h W^T with W (V, d). For SmolLM2-135M that
is a 49152 x 576 float32 matrix, 113 MB streamed per pass, about a sixth of the pass. Greedy decoding
needs only each position's argmax. :class:`VocabScreen` finds it exactly:

1. a screen s = bf16(h) bf16(W)^T through oneDNN (half the bytes: 2.9 ms against 4.6 ms for one
   row through ``F.linear`` and 5.2-6.3 ms for 1-8 rows through oneDNN in float32, on a 2-core AMX
   Xeon, weights from DRAM);
2. a rigorous bound |s_v - l_v| <= E0 + u'|s_v| for every v, where l is the float32 logit
   (Cauchy-Schwarz on the rounding residuals and the summation error of both products, per
   position; the screen's bfloat16 output rounding, per value; :meth:`VocabScreen.error_bound`);
3. every v whose screen value could still reach the float32 maximum is a candidate
   (:meth:`VocabScreen.threshold`, from each row's top screen value alone): the true argmax
   always is one, and each candidate's logit is recomputed in float32.

The result is a (..., V) float32 tensor whose entries are float32 logits at every candidate and the
(lower) screen values elsewhere, so its argmax is the float32 argmax. Candidate logits are float32
sums in another order than ``F.linear`` (last-bit differences, like any batched pass). On 5,000 of
SmolLM2's own states the screen left 4.6 candidates per position on average (median 2, at most 221),
and a whole one-token pass got 2.6 ms cheaper (41.5 against 38.9 ms; ``bench/smollm2/NOTES.md`` §13).

Only for greedy consumers: a sampler needs every logit, and :func:`~multitoken.model.protocol.greedy_verify`
says when a pass needs only the argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from multitoken.hf.kernels import available as onednn_available

BF16_ROUNDOFF = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand, round to nearest)
F32_ROUNDOFF = 2.0 ** -24
# |bf16(x) - x| <= u' |bf16(x)| for the screen's bfloat16 outputs (u / (1 - u), with 1% to spare).
OUTPUT_ROUNDOFF = 1.01 * BF16_ROUNDOFF / (1 - BF16_ROUNDOFF)


def fast_bf16_available() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX) through oneDNN: where it
    does not, oneDNN emulates bfloat16 and the screen costs more than the float32 head it replaces."""
    cpu = torch.cpu
    native = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(cpu, "_is_amx_tile_supported",
                                                                                   lambda: False)()
    return bool(native) and onednn_available()


def summation_error_factor(n: int) -> float:
    """gamma_{2n} = 2n u / (1 - 2n u) in float32: bounds the rounding of any order of summing n
    products (pairs summed before accumulating count twice)."""
    k = 2 * n * F32_ROUNDOFF
    return k / (1 - k)


class VocabScreen:
    """Exact-argmax logits of ``weight`` (V, d) float32 (the base's ``lm_head``, no bias).

    The bfloat16 copy (half the float32 weight's memory) and its norms are built on first use and
    rebuilt when the weight is replaced or modified in place."""

    def __init__(self, weight: Tensor, onednn: bool | None = None):
        if weight.dtype != torch.float32 or weight.dim() != 2:
            raise ValueError(f"VocabScreen needs a (V, d) float32 weight, got {tuple(weight.shape)} {weight.dtype}")
        self.weight = weight
        self.onednn = fast_bf16_available() if onednn is None else onednn
        self._key: tuple = ()

    def _prepare(self) -> None:
        w = self.weight.detach()
        key = (w.data_ptr(), w._version)
        if key == self._key:
            return
        with torch.no_grad():
            low = w.bfloat16()  # (V, d)
            self.low = torch.ops.mkldnn._reorder_linear_weight(low, 4) if self.onednn else low
            # max_v ||w_v - bf16(w_v)|| and max_v ||bf16(w_v)||: the bound's weight-side factors
            self.residual_norm = float((w - low.float()).norm(dim=1).max())
            self.low_norm = float(low.float().norm(dim=1).max())
        self.gamma = summation_error_factor(w.shape[1])
        self._key = key

    def screen(self, h_low: Tensor) -> Tensor:
        """(N, d) bfloat16 -> (N, V) float32 screen logits (bfloat16 products summed in float32)."""
        self._prepare()
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(h_low, self.low, None, "none", [], "").float()
        return F.linear(h_low, self.low).float()

    def error_bound(self, h: Tensor, h_low: Tensor) -> Tensor:
        """(N,) E0 such that |s_v - l_v| <= E0 + u' |s_v| for every v (u' from the screen's
        bfloat16 output rounding), l = the float32 logits h W^T in any summation order.

        s - exact = (bf16(h) - h)·bf16(w) + h·(bf16(w) - w) + the screen's summation and output
        rounding; exact - l = l's summation rounding. By Cauchy-Schwarz, with the maxima over v:
        E0 = ||h_low - h|| max||bf16(w)|| + ||h|| max||w - bf16(w)|| + gamma (||h_low|| + ||h||) max||w||
        (each product's summation error; max||w|| <= max||bf16(w)|| + max||w - bf16(w)||), times
        1.01 for the rounding of this very computation.
        """
        self._prepare()
        h_low = h_low.float()
        h_norm, low_norm, diff_norm = h.norm(dim=-1), h_low.norm(dim=-1), (h_low - h).norm(dim=-1)
        w_norm = self.low_norm + self.residual_norm
        return 1.01 * (diff_norm * self.low_norm + h_norm * self.residual_norm
                       + self.gamma * (low_norm + h_norm) * w_norm) + 1e-30

    def threshold(self, top: Tensor, e0: Tensor) -> Tensor:
        """(N,) screen value below which no v can hold the float32 maximum, from each row's top
        screen value: l_v <= f(s_v) = s_v + u'|s_v| + E0 and l_max >= s_top - u'|s_top| - E0, and
        f is increasing, so v with s_v < f^-1(s_top - u'|s_top| - E0) is below the maximum."""
        u = OUTPUT_ROUNDOFF
        z = top - u * top.abs() - 2 * e0  # f(s_v) < top - u|top| - E0  <=>  s_v + u|s_v| < z
        return torch.where(z >= 0, z / (1 + u), z / (1 - u))

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., d) float32 -> (..., V) float32 whose argmax is the float32 argmax: float32
        logits at every candidate, the screen (below the maximum) elsewhere."""
        h = hidden.reshape(-1, hidden.shape[-1])  # (N, d)
        h_low = h.bfloat16()
        s = self.screen(h_low)  # (N, V)
        threshold = self.threshold(s.amax(dim=-1), self.error_bound(h, h_low))  # (N,)
        rows, cols = (s >= threshold[:, None]).nonzero(as_tuple=True)  # (C,) each: the candidates
        s[rows, cols] = (h[rows] * self.weight[cols]).sum(-1)  # float32 logits where the maximum can be
        return s.view(*hidden.shape[:-1], s.shape[-1])
