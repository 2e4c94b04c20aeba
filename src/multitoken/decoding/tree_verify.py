"""Tree verification: the tutorial's "parallel decoding", done in one forward pass.

The MTP heads propose, at the last committed position, a top-k list of candidates for each
future offset: head j's candidates are guesses for the token j places after the pending
token. A *tree* (:mod:`multitoken.decoding.tree_flat`) picks which combinations to check.

:class:`TreeStep` is the step :func:`~multitoken.decoding.loop.decode_loop` runs for
``generate(mode="tree")``: one ``model.verify`` pass scores the whole flattened tree with a
tree attention mask (each node sees the committed prefix, its ancestors and itself; its
position is the prefix length + its depth), a path is chosen
(:mod:`multitoken.decoding.tree_steps`), and ``model.accept`` commits the chosen
root-to-node path, moving its KV entries into contiguous cache slots. Trees are static (a
list of paths: a preset, user-given, or tuned by :func:`~multitoken.decoding.tree_tuning.tune_tree`
and saved as ``tree.json`` next to the model) or dynamic (rebuilt every step, per batch row,
from the heads' probabilities up to a node budget).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from multitoken.decoding.loop import StepResult
from multitoken.decoding.cost import CostModel
from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.decoding.lookup import LookupDrafter, check_lookup
from multitoken.decoding.sampling import Sampler
from multitoken.decoding.tree_flat import FlatTree, flatten_tree
from multitoken.decoding.tree_presets import resolve_tree
from multitoken.decoding.tree_steps import (
    ChildRule, StepTree, dynamic_step_tree, greedy_path, lossless_child_rule, path_nodes, root_only_tree,
    sample_path, static_step_tree, tree_tokens,
)
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel


def resolve_static_tree(tree, model: MTPDecoderModel) -> FlatTree:
    """The static tree ``tree`` (see :func:`~multitoken.decoding.tree_presets.resolve_tree`, or a
    FlatTree) flattened for ``model``: no deeper than its draft heads, no rank past its vocabulary
    (a preset, the default included, is fitted to the vocabulary; explicit paths are refused)."""
    heads = model.n_future - 1
    if isinstance(tree, FlatTree):
        flat = flatten_tree(tree.paths, heads)
    else:
        flat = flatten_tree(resolve_tree(tree, None, heads, model.vocab_size), heads)
    if flat.top_k > model.vocab_size:
        raise MultitokenError(f"tree uses rank {flat.top_k - 1}, but the vocabulary has only "
                              f"{model.vocab_size} tokens")
    return flat


class TreeStep:
    """Tree-verified self-speculative decoding steps.

    tree: static tree (paths, preset name, JSON, tree.json/model folder, or FlatTree); None
    with ``budget`` None means the default preset. budget: build a dynamic tree of at most
    this many draft nodes per row each step instead (ranked by the product of the heads'
    softmax probabilities, warped like the target when sampling). Trees are cut to
    ``num_draft`` levels and to what the rows may still emit.
    lookup: also graft, each step, a prompt-lookup continuation of up to this many tokens onto
    the tree (:mod:`multitoken.decoding.lookup`; 0 = off); it may reach past the heads' depth;
    with ``cost_model`` a step grafts only when that is expected to pay. ``depth_cost`` (a
    CostModel, static trees) cuts each step's tree to the depth with the most expected tokens per cost,
    from the running rate at which its levels were reached (a
    :class:`~multitoken.decoding.draft_length.DraftLengthPolicy` over the tree's levels, as the
    chain sizes its drafts), so a stretch of prose the heads rarely guess verifies the pending
    token (and any lookup chain) alone.
    child_rule: acceptance rule for sampling (tests inject wrong ones).
    Each step reports the real nodes it verified per row (root included) and, on the chosen
    path, the drafts accepted and verified.
    """

    def __init__(self, model: MTPDecoderModel, sampler: Sampler, num_draft: int, tree=None,
                 budget: int | None = None, child_rule: ChildRule | None = None, lookup: int = 0,
                 cost_model: CostModel | None = None, depth_cost: CostModel | None = None):
        if tree is not None and budget is not None:
            raise MultitokenError("give either a static tree or a dynamic tree budget, not both")
        self.model, self.sampler, self.k, self.budget = model, sampler, num_draft, budget
        self.rule = child_rule if child_rule is not None else lossless_child_rule
        if budget is not None:
            if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
                raise MultitokenError(f"tree budget must be an integer >= 1, got {budget!r}")
            reachable = sum(model.vocab_size ** d for d in range(1, num_draft + 1))  # nodes a depth-k tree can have
            self.static, width_max = None, min(int(budget), reachable) + 1
        else:
            self.static = resolve_static_tree(tree, model).truncated(num_draft)
            width_max = self.static.width
        self.lookup, self.cost_model = check_lookup(lookup), cost_model
        self.lookup_drafter: LookupDrafter | None = None
        self.extra_capacity = width_max + self.lookup + model.n_future + 2
        self.step_trees: dict[int, StepTree | None] = {}  # static tree per depth limit, for this batch size
        self.can_select = True
        self.depth_policy: DraftLengthPolicy | None = None
        if depth_cost is not None and self.static is not None and self.static.max_depth > 0:
            self.depth_policy = DraftLengthPolicy(self.static.max_depth, cost_model=depth_cost)
            cuts = [self.static.truncated(d) for d in range(self.static.max_depth + 1)]
            self.level_widths = [1 if cut is None else cut.width for cut in cuts]  # root included
        self.heads_depth = 0

    def start(self, state, rows: list[Tensor]) -> None:
        self.batch, self.device = len(rows), rows[0].device
        self.lookup_drafter = LookupDrafter(rows, self.lookup, self.cost_model) if self.lookup else None

    def _depth_cost(self, levels: int) -> float:
        """The step cost of the static tree cut to ``levels``, at this batch (for the depth policy)."""
        return self.depth_policy.cost_model.step_cost(levels, self.batch, self.level_widths[levels])

    def want(self) -> int:
        return self.k + self.lookup  # a lookup chain may reach past the heads

    def _draft(self, state, pending: Tensor, depth: int) -> tuple[StepTree | None, Tensor | None]:
        """This step's tree and its candidates (B, d, K) top-K token ids of heads 1..d (None, None: no drafts)."""
        model = self.model
        if self.static is not None:
            if depth not in self.step_trees:
                cut = self.static.truncated(depth)
                self.step_trees[depth] = None if cut is None else static_step_tree(cut, self.batch, self.device)
            step = self.step_trees[depth]
            if step is None:
                return None, None
            _, draft_logits = model.draft(state, pending, step.max_depth, lambda lg, j: lg.argmax(-1))
            return step, draft_logits.topk(self.static.top_k, dim=-1).indices  # (B, d, K)
        _, draft_logits = model.draft(state, pending, depth, lambda lg, j: lg.argmax(-1))
        top = min(int(self.budget), model.vocab_size)
        probs = draft_logits.softmax(-1) if self.sampler.greedy else self.sampler.probs(draft_logits)
        values, candidates = probs.topk(top, dim=-1)  # (B, d, K) descending
        step = dynamic_step_tree(values, int(self.budget))
        return (None, None) if step.max_depth == 0 else (step, candidates)

    def step(self, state, pending: Tensor, depth: int) -> StepResult:
        heads_depth = min(depth, self.k)
        if self.depth_policy is not None and heads_depth > 0:
            heads_depth = min(heads_depth, self.depth_policy.choose(cost_of=self._depth_cost))
        self.heads_depth = heads_depth
        step, candidates = self._draft(state, pending, heads_depth) if heads_depth > 0 else (None, None)
        if step is None:
            step = root_only_tree(self.batch, self.device)
        tokens = tree_tokens(step, pending, candidates)  # (B, W)
        if self.lookup_drafter is not None:
            step, tokens = self.lookup_drafter.graft(step, tokens, pending, depth)  # (B, W') with lookup nodes
        logits = self.model.verify(state, tokens, step.mask, step.depths)  # (B, W, V)
        if self.sampler.greedy:
            node, nxt = greedy_path(step, tokens, logits)
        else:
            node, nxt = sample_path(step, tokens, logits, self.sampler, self.rule)
        keep, counts = path_nodes(step, node)
        path_tokens = tokens.gather(1, keep).tolist()
        counts_l, nxt_l = counts.tolist(), nxt.tolist()
        has_kids = (step.children[torch.arange(self.batch, device=self.device), node, 0] >= 0).tolist()
        accepted = [c - 1 for c in counts_l]
        emitted = [path_tokens[b][1: counts_l[b]] + [nxt_l[b]] for b in range(self.batch)]
        drafted = [a + int(h) for a, h in zip(accepted, has_kids)] if step.max_depth > 0 else None
        # Accepted nodes that only lookup proposed (rank -1, the root excepted; keep is 0-padded).
        from_lookup = ((step.ranks.gather(1, keep) < 0) & (keep > 0)).sum(1).tolist() if self.lookup else None
        return StepResult(nxt, counts, keep, emitted, accepted, drafted, step.nodes.tolist(), from_lookup)

    def committed(self, result: StepResult, counts: Tensor, active: list[bool]) -> None:
        if self.lookup_drafter is not None:
            self.lookup_drafter.commit(result.emitted, result.from_lookup, active)
        if self.depth_policy is not None and self.heads_depth > 0:
            lookup_only = result.from_lookup or [0] * len(active)
            for b, on in enumerate(active):  # levels of the heads' tree this row's path reached
                if on:
                    self.depth_policy.update(min(result.accepted[b] - lookup_only[b], self.heads_depth),
                                             self.heads_depth)

    def select(self, index: Tensor) -> None:
        self.batch = index.shape[0]
        if self.lookup_drafter is not None:
            self.lookup_drafter.select(index)
        self.step_trees.clear()  # static step trees are expanded to the batch size
