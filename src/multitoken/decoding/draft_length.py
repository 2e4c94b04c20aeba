"""Adaptive draft length: how many drafts to verify next, from running acceptance and cost.

With conditional acceptance rates a_1..a_K (draft j accepted given drafts < j were), a step
that verifies k drafts emits on average E(k) = 1 + sum_{j<=k} a_1 ... a_j tokens per row.
Its cost C(k), in plain steps, comes from a calibrated :class:`~multitoken.decoding.cost.CostModel`
(the default: C(k) = verify cost of B x (k+1) tokens + the heads' cost of drafting k, at the
batch's B rows, so a large batch, whose verify pass is wider, drafts less), or from a hand-set
``draft_cost``: C(k) = 1 + k * draft_cost, one more draft costing that fraction of a step.
:class:`DraftLengthPolicy` picks the k that maximises E(k) / C(k) (tokens per second), with
a_j estimated from recent steps (exponential decay, a Beta(1, 1) prior), so a run of prose
with rarely accepted drafts verifies fewer of them and a run of code drafts them all.
Output is unaffected: every k is exact.
"""
from __future__ import annotations

from collections.abc import Callable

from multitoken.decoding.cost import CostModel
from multitoken.decoding.sampling import is_finite_number
from multitoken.errors import MultitokenError


class DraftLengthPolicy:
    """Chooses each step's draft length (0..max_draft) maximising E(k) / C(k); see the module docstring.

    cost_model: C(k) from calibrated costs at ``batch`` rows (``batch`` follows the decode as
    rows leave it); without one, C(k) = 1 + k * draft_cost.
    """

    def __init__(self, max_draft: int, draft_cost: float = 0.1, decay: float = 0.9, probe_every: int = 8,
                 cost_model: CostModel | None = None, batch: int = 1):
        if max_draft < 1:
            raise MultitokenError(f"max_draft must be >= 1, got {max_draft}")
        if not is_finite_number(draft_cost) or not draft_cost >= 0:
            raise MultitokenError(f"draft_cost must be a finite number >= 0, got {draft_cost}")
        if not (is_finite_number(decay) and 0 < decay <= 1):
            raise MultitokenError(f"decay must be in (0, 1], got {decay}")
        self.max_draft, self.draft_cost, self.decay, self.probe_every = max_draft, draft_cost, decay, probe_every
        self.cost_model, self.batch = cost_model, batch
        self.accepted = [0.0] * max_draft  # decayed counts per draft position
        self.attempted = [0.0] * max_draft
        self._plain_steps = 0  # consecutive steps without drafts (then one probe step drafts 1)

    def rates(self) -> list[float]:
        """Estimated conditional acceptance a_1..a_K (posterior means)."""
        return [(a + 1.0) / (t + 2.0) for a, t in zip(self.accepted, self.attempted)]

    def step_cost(self, k: int) -> float:
        """C(k): a step verifying k drafts, in plain steps."""
        if self.cost_model is None:
            return 1.0 + k * self.draft_cost
        return self.cost_model.step_cost(k, self.batch)

    def choose(self, base: float = 1.0, cost_of: Callable[[int], float] | None = None) -> int:
        """Drafts to verify next step (0..max_draft). ``base``: tokens a step emits without any of
        these drafts (1: the bonus token; more when they are added to other drafts, as prompt
        lookup adds to the heads' tree); ``cost_of(k)``: the step's cost with k of them
        (default :meth:`step_cost`)."""
        cost_of = self.step_cost if cost_of is None else cost_of
        best_k, expected, survive = 0, base, 1.0
        best = base / max(cost_of(0), 1e-12)
        for k, rate in enumerate(self.rates(), start=1):
            survive *= rate
            expected += survive
            ratio = expected / max(cost_of(k), 1e-12)
            if ratio > best:
                best_k, best = k, ratio
        if best_k == 0:
            # Drafting looks unprofitable; still try one draft now and then, or the estimate never recovers.
            self._plain_steps += 1
            return 1 if self._plain_steps % self.probe_every == 0 else 0
        self._plain_steps = 0
        return best_k

    def update(self, accepted: int, drafted: int) -> None:
        """A row verified ``drafted`` drafts and accepted the first ``accepted``."""
        for j in range(self.max_draft):
            self.accepted[j] *= self.decay
            self.attempted[j] *= self.decay
        for j in range(min(accepted + 1, drafted)):  # position j was tried iff drafts < j were accepted
            self.attempted[j] += 1.0
            self.accepted[j] += float(j < accepted)
