"""What a decoding step costs on the running machine, relative to one plain decoding step.

A :class:`CostModel` holds, for a few batch sizes B, the cost of one verify pass of W new
tokens per row (W = 1..16, measured at a few widths, linear in between) and of drafting k
tokens with the model's heads (``model.draft``), both in units of a plain step (a verify
pass of 1 token at batch 1). Between and beyond the measured batches and widths costs are
piecewise linear, so the verify pass of a batch of B rows drafting k tokens each (B x (k+1)
tokens) has a cost too. :func:`calibrate` measures one through the model's own protocol in
a few seconds (few repeats, medians); :mod:`multitoken.decoding.cost_cache` keeps it on disk
once per model and machine. :class:`PassTimer` is the timing core (the verify-cost benchmark,
:mod:`multitoken.measure.verify_cost`, builds on it).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

import torch

from multitoken.decoding.batch import device_of
from multitoken.decoding.tree_flat import FlatTree, flatten_tree
from multitoken.decoding.tree_presets import build_tree, prior_acceptance
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel, greedy_verify

CALIBRATION_WIDTHS = (1, 2, 3, 4, 6, 8, 12, 16)  # verify widths measured (others interpolated)
CALIBRATION_BATCHES = (1, 4)  # batch sizes measured (others interpolated / extrapolated)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so a wall-clock
    timer around a forward pass measures the pass; a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, the device's queued work included."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    """Seconds of ``repeats`` calls of ``fn`` after one untimed warm-up call."""
    return [seconds(fn, device) for _ in range(repeats + 1)][1:]


def width_tree(num_heads: int, width: int) -> FlatTree | None:
    """The tree a verify pass of ``width`` nodes (root included) is timed with: the prior-built
    tree of width - 1 draft nodes, so masks and depths look like real ones (None: width 1)."""
    return flatten_tree(build_tree(prior_acceptance(num_heads, width), width - 1)) if width > 1 else None


class PassTimer:
    """Timed passes over a committed random prefix of ``prefix_len`` tokens per row.

    ``verify`` writes pending entries only, so every timed verify pass sees the same cache;
    each timed ``draft`` follows a one-token step (verify + accept), as in decoding, where the
    heads draft after a commit (heads that keep their own state catch up on it there), so
    the state grows by one token per draft call: ``draft_calls`` sizes the cache for them.
    """

    def __init__(self, model: MTPDecoderModel, batch_size: int, prefix_len: int, max_width: int, seed: int = 0,
                 draft_calls: int = 0):
        self.heads = max(model.n_future - 1, 1)
        room = model.max_seq_len - max_width - draft_calls - 1  # the cache must hold every timed pass
        if not 1 <= prefix_len <= room:
            raise MultitokenError(f"prefix_len must be in [1, {room}] for this model, got {prefix_len}")
        self.model, self.device = model, device_of(model)
        self.gen = torch.Generator().manual_seed(seed)
        prefix = self.random_tokens(batch_size, prefix_len)
        self.state = model.new_state(batch_size, prefix_len + max_width + draft_calls + 1)
        model.verify(self.state, prefix)
        self.ones = torch.ones(batch_size, dtype=torch.long, device=self.device)
        model.accept(self.state, None, prefix_len * self.ones)
        self.pending = self.random_tokens(batch_size, 1)[:, 0]  # (B,)

    def random_tokens(self, batch: int, width: int) -> torch.Tensor:
        return torch.randint(0, self.model.vocab_size, (batch, width), generator=self.gen).to(self.device)

    def verify(self, width: int, repeats: int) -> list[float]:
        """Seconds of ``repeats`` verify passes of a ``width``-node tree per row."""
        tree = width_tree(self.heads, width)
        block = self.random_tokens(self.state.lengths.shape[0], width)
        mask = tree.mask.to(self.device) if tree else None
        depths = tree.depths.to(self.device) if tree else None
        return timed(lambda: self.model.verify(self.state, block, mask, depths), self.device, repeats)

    def draft(self, k: int, repeats: int) -> list[float]:
        """Seconds of ``repeats`` ``model.draft`` calls of ``k`` tokens (argmax picks, as decoding
        does), each after a one-token step (untimed; ``repeats + 1`` of them, the warm-up included)."""
        pick = lambda lg, j: lg.argmax(-1)
        times = []
        for _ in range(repeats + 1):
            self.model.verify(self.state, self.pending[:, None])
            self.model.accept(self.state, None, self.ones)
            times.append(seconds(lambda: self.model.draft(self.state, self.pending, k, pick), self.device))
        return times[1:]


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through the points (xs ascending), extended linearly past both
    ends with the slope of the nearest two points (one point: constant)."""
    if len(xs) == 1:
        return float(ys[0])
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class CostModel:
    """Pass costs relative to one plain decoding step (a verify pass of 1 token at batch 1).

    verify[i][j]: a verify pass of ``widths[j]`` tokens per row at batch ``batches[i]``;
    draft[i][k-1]: ``model.draft`` of k tokens at batch ``batches[i]`` (empty: no heads).
    """

    batches: list[int]
    widths: list[int]
    verify: list[list[float]]
    draft: list[list[float]] = field(default_factory=list)
    plain_seconds: float = 0.0  # the unit, when measured

    def __post_init__(self):
        self.batches, self.widths = [int(b) for b in self.batches], [int(w) for w in self.widths]
        self.verify = [[float(c) for c in row] for row in self.verify]
        self.draft = [[float(c) for c in row] for row in self.draft] or [[] for _ in self.batches]
        ok = (self.batches and self.widths and self.batches == sorted(set(self.batches))
              and self.widths == sorted(set(self.widths)) and min(self.batches) >= 1 and min(self.widths) >= 1
              and len(self.verify) == len(self.draft) == len(self.batches)
              and all(len(r) == len(self.widths) for r in self.verify)
              and len({len(r) for r in self.draft}) == 1
              and all(math.isfinite(c) and c >= 0 for r in self.verify + self.draft for c in r))
        if not ok:
            raise MultitokenError("a cost model needs ascending distinct batches and widths >= 1, one verify row "
                                  "per batch with a finite cost >= 0 per width, and draft rows of one length")

    def verify_cost(self, width: int, batch: int = 1) -> float:
        """A verify pass of ``width`` tokens per row for ``batch`` rows."""
        per_batch = [interpolate(self.widths, row, width) for row in self.verify]
        return max(interpolate(self.batches, per_batch, batch), 0.0)

    def draft_cost(self, k: int, batch: int = 1) -> float:
        """Drafting ``k`` tokens for ``batch`` rows (0 for k = 0 or a model without heads)."""
        if k <= 0 or not self.draft[0]:
            return 0.0
        depths = list(range(1, len(self.draft[0]) + 1))
        per_batch = [interpolate([0] + depths, [0.0] + row, k) for row in self.draft]
        return max(interpolate(self.batches, per_batch, batch), 0.0)

    def step_cost(self, k: int, batch: int = 1, width: int | None = None) -> float:
        """A decoding step that drafts ``k`` tokens (heads 1..k) and verifies ``width`` tokens
        per row (default k + 1: a chain)."""
        return self.verify_cost(k + 1 if width is None else width, batch) + self.draft_cost(k, batch)

    def to_dict(self) -> dict:
        return {"batches": self.batches, "widths": self.widths, "verify": self.verify, "draft": self.draft,
                "plain_seconds": self.plain_seconds}

    @classmethod
    def from_dict(cls, record: dict) -> CostModel:
        """The inverse of :meth:`to_dict`; a record of another shape raises MultitokenError."""
        try:
            return cls(record["batches"], record["widths"], record["verify"], record.get("draft", []),
                       float(record.get("plain_seconds", 0.0)))
        except MultitokenError:
            raise
        except (KeyError, TypeError, AttributeError, ValueError) as e:  # ValueError: a cost that is no number
            raise MultitokenError(f"not a cost model record ({type(e).__name__}: {e})") from None


def non_decreasing(values: list[float]) -> list[float]:
    """Running maximum: a pass never costs less for more tokens, so a noisy dip (another
    process paused) must not make a wider pass look cheaper."""
    out, top = [], 0.0
    for v in values:
        top = max(top, v)
        out.append(top)
    return out


@torch.no_grad()
def calibrate(model: MTPDecoderModel, batches: Sequence[int] = CALIBRATION_BATCHES,
              widths: Sequence[int] = CALIBRATION_WIDTHS, repeats: int = 3, prefix_len: int = 128,
              progress: TextIO | None = sys.stderr) -> CostModel:
    """Measure a :class:`CostModel` for ``model`` on this machine (medians of ``repeats``
    passes after a warm-up; a few seconds for a 135M model on 2 CPU cores).

    Widths past what the context holds after the prefix (and the one-token steps drafting is
    timed after) are dropped; the prefix is cut to half the context for short-context models.
    ``progress`` gets one line.
    """
    if repeats < 1:
        raise MultitokenError(f"repeats must be >= 1, got {repeats}")
    draft_calls = (model.n_future - 1) * (repeats + 1)
    prefix_len = max(1, min(prefix_len, model.max_seq_len // 2))
    widths = sorted({int(w) for w in widths if 1 <= w <= model.max_seq_len - prefix_len - draft_calls - 1} | {1})
    batches = sorted({int(b) for b in batches if b >= 1} | {1})  # batch 1 holds the unit
    heads = model.n_future - 1
    start = time.perf_counter()
    if progress is not None:
        print(f"multitoken: calibrating decode costs (verify widths {widths[0]}..{widths[-1]}, batches "
              f"{', '.join(map(str, batches))}, {heads} draft heads), once per model and machine ...",
              end="", file=progress, flush=True)
    verify, draft = [], []
    # A model's warnings about batched passes speak of the user's decode, not of this probe. The passes
    # are timed as greedy decoding runs them (the defaults it drives are greedy ones).
    with torch.inference_mode(), warnings.catch_warnings(), greedy_verify():
        warnings.simplefilter("ignore")
        for b in batches:
            timer = PassTimer(model, b, prefix_len, widths[-1], draft_calls=draft_calls)
            verify.append(non_decreasing([statistics.median(timer.verify(w, repeats)) for w in widths]))
            draft.append(non_decreasing([statistics.median(timer.draft(k, repeats)) for k in range(1, heads + 1)]))
    plain = verify[0][0] if verify[0][0] > 0 else 1e-9
    cost = CostModel(batches, widths, [[s / plain for s in row] for row in verify],
                     [[s / plain for s in row] for row in draft], plain)
    if progress is not None:
        print(f" done in {time.perf_counter() - start:.1f} s (verify of {widths[-1]} tokens "
              f"{cost.verify_cost(widths[-1]):.2f}x a step, drafting {heads} {cost.draft_cost(heads):.2f}x)",
              file=progress, flush=True)
    return cost
