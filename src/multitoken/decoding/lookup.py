"""Prompt lookup inside the verification tree: copied n-gram continuations and head drafts, verified together.

Prompt lookup (n-gram drafting) guesses that text repeats: find the most recent earlier place
where the last few tokens of the sequence (prompt + output so far + the pending token) occurred,
and propose the tokens that followed there. It costs no model pass and is often right for
long runs when an answer restates its prompt (a function signature, a quoted name, code being
edited). The heads are right more often but only a few tokens deep. vLLM and llama.cpp pick
one drafter per step; here a step verifies both in one pass: the lookup continuation is
grafted onto the heads' tree as a chain from the root, merged into existing nodes as long as
its tokens equal theirs (:func:`graft_chains`), so the two only cost the nodes they do not share.

Lookup nodes are deterministic candidates like the heads' (one-hot q), and siblings stay
distinct, so greedy tree verification still emits plain greedy's tokens and lossless tree
sampling still samples the target's distribution.

:class:`LookupDrafter` decides, each step, whether to graft: with a calibrated
:class:`~multitoken.decoding.cost.CostModel` it grafts when the tokens lookup-only nodes have
recently added per proposal, times the rows that found a continuation, over the verify cost
their extra width adds to the whole batch, beat the batch's tokens per cost without them.
Where copied guesses rarely hold beyond what the heads already guessed it then grafts only
now and then (a short probe that keeps the estimate fresh); code that restates its prompt
grafts every time it finds a match. Without a cost model it always grafts.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from multitoken.decoding.cost import CostModel
from multitoken.decoding.tree_steps import StepTree, child_lists, step_tree_from_rows
from multitoken.errors import MultitokenError

# Longest and shortest suffix matched, longest first (HF's prompt lookup: 2..1). One-token
# matches were measured to propose mostly wrong chains on SmolLM2's prose answers.
LOOKUP_NGRAMS = (3, 2)
DEFAULT_LOOKUP = 12  # tokens a chain may propose per step when lookup is on by default


def check_lookup(lookup, ngrams: Sequence[int] = LOOKUP_NGRAMS) -> int:
    """``lookup`` (tokens a continuation may propose per step; 0 = off) checked, as an int."""
    if isinstance(lookup, bool) or not isinstance(lookup, int) or lookup < 0:
        raise MultitokenError(f"prompt lookup must be an integer >= 0 (tokens per step; 0 = off), got {lookup!r}")
    if len(ngrams) != 2 or not 1 <= ngrams[1] <= ngrams[0]:
        raise MultitokenError(f"lookup n-grams must be (longest, shortest) with 1 <= shortest <= longest, got {ngrams}")
    return lookup


def lookup_continuation(seq: Sequence[int], length: int, ngrams: Sequence[int] = LOOKUP_NGRAMS) -> list[int]:
    """Up to ``length`` tokens that followed an earlier occurrence of ``seq``'s last n tokens,
    trying n from ``ngrams[0]`` down to ``ngrams[1]``; [] when none occurred. Of the
    occurrences of one n, the most recent that is followed by ``length`` tokens wins, else the
    earliest (the longest continuation: in a repeated run the most recent one would propose
    only the run's last token).

    >>> lookup_continuation([5, 6, 7, 8, 9, 5, 6], 3)
    [7, 8, 9]
    """
    longest, shortest = ngrams
    end = len(seq)
    if length <= 0:
        return []
    for n in range(min(longest, end - 1), shortest - 1, -1):
        suffix, found = list(seq[end - n:]), None
        for start in range(end - n - 1, -1, -1):  # most recent first; the suffix itself excluded
            if seq[start] == suffix[0] and list(seq[start:start + n]) == suffix:
                found = start
                if end - start - n >= length:
                    break
        if found is not None:
            return list(seq[found + n: found + n + length])
    return []


def graft_chains(tree: StepTree, tokens: Tensor, chains: Sequence[Sequence[int]]) -> tuple[StepTree, Tensor]:
    """Graft each row's chain of tokens onto its tree below the root.

    tokens: (B, W) the tree's block tokens (root = the pending token). Row b's chain follows the
    tree's nodes while its tokens equal theirs (children in order) and continues as new nodes
    (rank -1, appended after the tree's, depth one below their parent). Returns the per-row
    trees (padded to a common width) and their (B, W') tokens; W' = W when nothing was added.
    """
    batch, width = tokens.shape
    rows, row_tokens = [], []
    parents_all, depths_all = tree.parents.tolist(), tree.batched("depths").tolist()
    ranks_all, nodes, token_lists = tree.ranks.tolist(), tree.nodes.tolist(), tokens.tolist()
    for b in range(batch):
        real = nodes[b]
        parents, depths = parents_all[b][:real], depths_all[b][:real]
        ranks, toks = ranks_all[b][:real], token_lists[b][:real]
        kids = child_lists(parents)
        node = 0
        for tok in chains[b]:
            child = next((c for c in kids[node] if toks[c] == tok), None)
            if child is None:
                child = len(parents)
                parents.append(node), depths.append(depths[node] + 1), ranks.append(-1), toks.append(int(tok))
                kids[node].append(child)
                kids.append([])
            node = child
        rows.append((parents, depths, ranks))
        row_tokens.append(toks)
    grafted = step_tree_from_rows(rows, tokens.device)
    pad = grafted.width
    block = torch.tensor([t + [t[0]] * (pad - len(t)) for t in row_tokens], dtype=tokens.dtype, device=tokens.device)
    return grafted, block


class LookupHistory:
    """Each batch row's committed tokens (prompt + output, the pending token not yet), for lookup."""

    def __init__(self, rows: Sequence[Tensor]):
        self.rows = [r.tolist() for r in rows]

    def continuations(self, pending: Tensor, length: int, ngrams: Sequence[int] = LOOKUP_NGRAMS) -> list[list[int]]:
        """Per row: :func:`lookup_continuation` of its tokens + its pending token."""
        return [lookup_continuation(row + [p], length, ngrams) for row, p in zip(self.rows, pending.tolist())]

    def commit(self, pending: Tensor, emitted: Sequence[Sequence[int]], active: Sequence[bool]) -> None:
        """A step committed the pending token and the accepted drafts (``emitted`` minus its last
        token, the next pending one) of every active row."""
        for row, p, out, on in zip(self.rows, pending.tolist(), emitted, active):
            if on:
                row.append(p)
                row.extend(out[:-1])

    def select(self, index: Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class LookupDrafter:
    """One decode's prompt lookup: the rows' histories, and whether a step grafts (see the module docstring).

    max_tokens: the longest chain; cost_model: None = graft whenever a continuation is found.
    Running means (decay ``decay`` per row-step that proposed) of the tokens accepted on
    lookup-only nodes (starting at 1, so lookup gets tried) and of the nodes a graft adds; while
    grafting does not pay, every ``probe_every``-th step with a match grafts its first
    ``probe_tokens`` tokens only, a cheap test of whether copying pays again.
    """

    def __init__(self, rows: Sequence[Tensor], max_tokens: int, cost_model: CostModel | None = None,
                 ngrams: Sequence[int] = LOOKUP_NGRAMS, decay: float = 0.8, probe_every: int = 4,
                 probe_tokens: int = 4):
        self.history, self.max_tokens, self.ngrams = LookupHistory(rows), check_lookup(max_tokens, ngrams), ngrams
        self.cost_model, self.decay, self.batch = cost_model, decay, len(rows)
        self.probe_every, self.probe_tokens = probe_every, probe_tokens
        self.gain = 1.0  # tokens accepted on lookup-only nodes per proposal
        self.added = max_tokens / 2  # nodes a graft adds per proposal
        self.base = 1.5  # tokens per row-step without lookup-only nodes
        self.skipped = 0  # steps in a row that the cost said not to graft
        self.chains: list[list[int]] = []  # this step's, per row (propose)
        self.pending: Tensor | None = None  # this step's pending tokens and the nodes each row's graft added
        self.new_nodes: list[int] = []

    def graft_length(self, tree_width: int, tree_depth: int, rows: int) -> int:
        """Tokens to graft this step when ``rows`` of the batch found a continuation: all when
        their expected gain over the extra cost beats the batch's tokens per cost (every row
        pays the wider pass: rows are padded to one width), else 0 or, every ``probe_every``-th
        such step, ``probe_tokens``."""
        if self.cost_model is None:
            return self.max_tokens
        cost = self.cost_model.step_cost(tree_depth, self.batch, tree_width)
        extra = self.cost_model.step_cost(tree_depth, self.batch, tree_width + round(self.added)) - cost
        if rows * self.gain * cost > self.batch * self.base * extra:
            self.skipped = 0
            return self.max_tokens
        self.skipped += 1
        return self.probe_tokens if self.skipped % self.probe_every == 0 else 0

    def propose(self, pending: Tensor, depth: int, tree_width: int, tree_depth: int) -> list[list[int]]:
        """Each row's chain for this step (at most ``depth`` tokens, [] where none is found or it
        does not pay); ``tree_width`` / ``tree_depth``: the heads' tree it is grafted on (root
        included / draft levels), for the cost."""
        length = min(self.max_tokens, depth)
        found = self.history.continuations(pending, length, self.ngrams) if length > 0 else []
        rows = sum(bool(chain) for chain in found)
        keep = self.graft_length(tree_width, tree_depth, rows) if rows else 0
        self.chains = [chain[:keep] for chain in found] if keep else [[] for _ in range(pending.shape[0])]
        return self.chains

    def graft(self, tree: StepTree, tokens: Tensor, pending: Tensor, depth: int) -> tuple[StepTree, Tensor]:
        """This step's tree and (B, W') block tokens with each row's chain (:meth:`propose`) grafted
        on by :func:`graft_chains`, or ``tree`` and ``tokens`` themselves when no row has one.
        Called every step (depth 0 included), so :meth:`commit` knows what this step proposed."""
        chains = self.propose(pending, depth, tree.width, tree.max_depth)
        self.pending, self.new_nodes = pending, [0] * len(chains)
        if not any(chains):
            return tree, tokens
        grafted, block = graft_chains(tree, tokens, chains)
        self.new_nodes = (grafted.nodes - tree.nodes).tolist()
        return grafted, block

    def commit(self, emitted: Sequence[Sequence[int]], from_lookup: Sequence[int], active: Sequence[bool]) -> None:
        """After the step :meth:`graft` built: ``emitted`` per row (accepted drafts + next token),
        ``from_lookup`` of them accepted on lookup-only nodes. Updates the running means and the
        histories."""
        d = self.decay
        for chain, out, gained, new, on in zip(self.chains, emitted, from_lookup, self.new_nodes, active):
            if not on:
                continue
            if chain:
                self.gain, self.added = d * self.gain + (1 - d) * gained, d * self.added + (1 - d) * new
            self.base = d * self.base + (1 - d) * (len(out) - gained)
        self.history.commit(self.pending, emitted, active)

    def select(self, index: Tensor) -> None:
        """The batch keeps rows ``index``; the per-step state is rebuilt by the next :meth:`graft`."""
        self.history.select(index)
        self.batch = index.shape[0]
