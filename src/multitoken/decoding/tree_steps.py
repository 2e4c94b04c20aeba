"""Per-step trees and path choice for tree verification.

A :class:`StepTree` is the tree one decoding step verifies, per batch row: a static tree
shared by every row (:func:`static_step_tree`), a dynamic tree rebuilt per row from the
heads' probabilities up to a node budget (:func:`dynamic_step_tree`), or the pending token
alone (:func:`root_only_tree`). After the verify pass a path is chosen:

* greedy (:func:`greedy_path`): the deepest node whose every token equals the base argmax
  at its parent wins; its path plus the bonus token (the base argmax at that node) are
  emitted, so the output is token-identical to plain greedy decoding;
* sampling (:func:`sample_path`, lossless, nodes are deterministic so q is one-hot): at each
  node try the children in rank order, accepting child x with probability p(x) / (remaining
  mass of p); a rejected child's token is zeroed out of p; if every child is rejected the
  next token is sampled from what is left of p; at a leaf it is sampled from p itself.

:func:`path_nodes` turns the chosen node into the block positions ``model.accept`` commits.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from multitoken.decoding.sampling import Sampler
from multitoken.decoding.tree_flat import FlatTree, ancestor_mask


@dataclass
class StepTree:
    """The trees of one decoding step, one per batch row, padded to a common width W.

    Padding nodes are copies of the root that attach to nothing (parent -1, depth 0, only
    themselves visible), so no path ever reaches them.
    """

    mask: Tensor  # (W, W) when every row shares the tree, else (B, W, W) bool
    depths: Tensor  # (W,) or (B, W) long
    parents: Tensor  # (B, W) long, -1 for roots and padding
    heads: Tensor  # (B, W) long: head that drafted the node (0 = root / padding)
    ranks: Tensor  # (B, W) long: rank in the head's top-k (-1 = root / padding)
    children: Tensor  # (B, W, C) long child node indices in rank order, -1 padded
    nodes: Tensor  # (B,) long: real nodes per row (root included)

    @property
    def width(self) -> int:
        return self.parents.shape[1]

    @property
    def max_depth(self) -> int:
        return int(self.heads.max())

    def batched(self, name: str) -> Tensor:
        t = getattr(self, name)
        want = 3 if name == "mask" else 2
        return t if t.dim() == want else t.expand(self.parents.shape[0], *t.shape)


def child_lists(parents: list[int]) -> list[list[int]]:
    """Child lists per node. Both static (sorted paths) and dynamic (best-first) node orders
    list siblings in rank order, so children come out in rank order too."""
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def step_tree_from_rows(rows: list[tuple[list[int], list[int], list[int]]], device) -> StepTree:
    """rows: per batch row (parents, depths, ranks) in topological order, root first."""
    width = max(len(p) for p, _, _ in rows)
    # Pad in Python and convert once: per-row tensor building dominates large batches.
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    kids = [child_lists(p) for p, _, _ in rows]
    fan = max(1, max(len(k) for ks in kids for k in ks))
    children = [[k + [-1] * (fan - len(k)) for k in ks] + [[-1] * fan] * (width - len(ks)) for ks in kids]
    parents = torch.tensor([pad(p, -1) for p, _, _ in rows], dtype=torch.long)
    depths = torch.tensor([pad(d, 0) for _, d, _ in rows], dtype=torch.long)
    ranks = torch.tensor([pad(r, -1) for _, _, r in rows], dtype=torch.long)
    mask = ancestor_mask(parents)
    nodes = torch.tensor([len(p) for p, _, _ in rows])
    return StepTree(mask.to(device), depths.to(device), parents.to(device), depths.to(device).clone(),
                    ranks.to(device), torch.tensor(children, dtype=torch.long).to(device), nodes.to(device))


def static_step_tree(tree: FlatTree, batch: int, device) -> StepTree:
    """Every row uses the same static tree: the mask and depths stay (W, W) and (W,)."""
    parents, ranks = tree.parents.tolist(), tree.ranks.tolist()
    one = step_tree_from_rows([(parents, tree.depths.tolist(), ranks)], device)
    expand = lambda t: t.expand(batch, *t.shape[1:])  # noqa: E731
    return StepTree(one.mask[0], one.depths[0], expand(one.parents), expand(one.heads), expand(one.ranks),
                    expand(one.children), expand(one.nodes))


def dynamic_tree_nodes(head_probs: Sequence[Sequence[float]], budget: int) -> tuple[list[int], list[int], list[int]]:
    """One row's dynamic tree: the ``budget`` nodes of largest cumulative probability.

    head_probs[j][r]: probability of head j+1's rank-r candidate, descending in r. A node's
    score is the product along its path, so a child never beats its parent and best-first
    search (expanding a popped node's next sibling and its first child) finds the top nodes
    exactly. Zero-probability nodes are never added.
    Returns (parents, depths, ranks), root first, in insertion order: parents precede
    children and siblings appear in rank order.
    """
    parents, depths, ranks = [-1], [0], [-1]
    depth_max, top_k = len(head_probs), len(head_probs[0]) if head_probs else 0
    if depth_max == 0 or top_k == 0 or budget < 1:
        return parents, depths, ranks
    counter = 0
    # (-score, tie-break, parent node, depth, rank, parent's score)
    heap = [(-head_probs[0][0], 0, 0, 1, 0, 1.0)]
    while heap and len(parents) <= budget:
        neg, _, parent, d, r, parent_score = heapq.heappop(heap)
        if -neg <= 0:
            break
        node = len(parents)
        parents.append(parent)
        depths.append(d)
        ranks.append(r)
        if r + 1 < top_k:  # next sibling: same parent, next rank
            counter += 1
            heapq.heappush(heap, (-parent_score * head_probs[d - 1][r + 1], counter, parent, d, r + 1, parent_score))
        if d < depth_max:  # first child
            counter += 1
            heapq.heappush(heap, (neg * head_probs[d][0], counter, node, d + 1, 0, -neg))
    return parents, depths, ranks


def dynamic_tree_paths(head_probs: Sequence[Sequence[float]], budget: int) -> list[list[int]]:
    """The paths of :func:`dynamic_tree_nodes` (parents first)."""
    parents, _, ranks = dynamic_tree_nodes(head_probs, budget)
    paths: list[list[int]] = [[]]
    for p, r in zip(parents[1:], ranks[1:]):
        paths.append(paths[p] + [r])
    return paths[1:]


def dynamic_step_tree(probs: Tensor, budget: int) -> StepTree:
    """probs: (B, k, K) the heads' top-K candidate probabilities (descending) -> per-row trees
    of at most ``budget`` draft nodes, padded to a common width."""
    return step_tree_from_rows([dynamic_tree_nodes(row, budget) for row in probs.tolist()], probs.device)


def root_only_tree(batch: int, device) -> StepTree:
    """No drafts (a plain step): the tree is the pending token alone."""
    return step_tree_from_rows([([-1], [0], [-1])] * batch, device)


def tree_tokens(tree: StepTree, pending: Tensor, candidates: Tensor | None) -> Tensor:
    """(B, W) block tokens: root and padding = pending; node = candidates[b, head-1, rank].

    candidates: (B, k, K) top-K token ids of heads 1..k (None when the tree is root-only).
    """
    block = pending[:, None].expand(-1, tree.width).clone()
    if candidates is None:
        return block
    k, top = candidates.shape[1], candidates.shape[2]
    real = tree.ranks >= 0
    flat = ((tree.heads - 1).clamp(min=0) * top + tree.ranks.clamp(min=0)).clamp(max=k * top - 1)
    picked = candidates.reshape(candidates.shape[0], -1).gather(1, flat)
    return torch.where(real, picked, block)


# rule(p_child (B,), mass (B,), slot) -> probability (B,) of accepting the child token, where
# p_child is its (unnormalised, rejected siblings zeroed) target mass, mass the total remaining
# mass and slot the child's position among its siblings. Injectable so tests can show that the
# distribution test catches a wrong rule.
ChildRule = Callable[[Tensor, Tensor, int], Tensor]


def lossless_child_rule(p_child: Tensor, mass: Tensor, slot: int) -> Tensor:
    """Accept a deterministic (q one-hot) candidate with probability p(x) renormalised."""
    return p_child / mass.clamp(min=1e-30)


def greedy_path(tree: StepTree, tokens: Tensor, logits: Tensor) -> tuple[Tensor, Tensor]:
    """Deepest node whose whole path matches the base argmax; returns (node (B,), bonus (B,))."""
    base = logits.argmax(-1)  # (B, W)
    parents = tree.parents
    par = parents.clamp(min=0)
    match = (tokens == base.gather(1, par)) & (parents >= 0)
    ok = torch.zeros_like(match)
    ok[:, 0] = True
    for i in range(1, tree.width):
        ok[:, i] = match[:, i] & ok.gather(1, par[:, i:i + 1]).squeeze(1)
    depths = tree.batched("depths")
    node = torch.where(ok, depths, torch.full_like(depths, -1)).argmax(1)  # (B,)
    rows = torch.arange(node.shape[0], device=node.device)
    return node, base[rows, node]


def sample_path(tree: StepTree, tokens: Tensor, logits: Tensor, sampler: Sampler,
                rule: ChildRule = lossless_child_rule) -> tuple[Tensor, Tensor]:
    """Lossless tree sampling (multi-candidate rejection sampling with one-hot drafts).

    Walk from the root; at each node try its children in rank order, accepting child x with
    probability ``rule`` (p(x) / remaining mass); on rejection zero p(x). If a child is
    accepted, descend; otherwise the next token is sampled from the remaining p (p itself at
    a leaf). Each emitted token is then distributed exactly as plain sampling from p.
    Returns (node (B,), next_token (B,)).
    """
    batch = tokens.shape[0]
    rows = torch.arange(batch, device=tokens.device)
    p_all = sampler.probs(logits)  # (B, W, V)
    cur = torch.zeros(batch, dtype=torch.long, device=tokens.device)
    p = p_all[:, 0].clone()  # (B, V) remaining target mass at the current node
    alive = torch.ones(batch, dtype=torch.bool, device=tokens.device)  # still descending
    children = tree.children
    for _ in range(tree.max_depth + 1):
        if not bool(alive.any()):
            break
        moved = torch.zeros_like(alive)
        for slot in range(children.shape[2]):
            child = children[rows, cur, slot]  # (B,)
            trying = alive & ~moved & (child >= 0)
            if not bool(trying.any()):
                continue
            tok = tokens[rows, child.clamp(min=0)]
            p_child = p[rows, tok]
            prob = rule(p_child, p.sum(-1), slot)
            u = sampler.uniform((batch,), tokens.device)
            accept = trying & (u < prob)
            reject = trying & ~accept
            p[rows[reject], tok[reject]] = 0.0
            moved |= accept
            cur = torch.where(accept, child, cur)
        if bool(moved.any()):
            p = torch.where(moved[:, None], p_all[rows, cur], p)
        alive = moved
    mass = p.sum(-1, keepdim=True)
    # mass is 0 only if p had all its mass on rejected children (a rule that rejects with p = 1).
    p = torch.where(mass > 0, p, p_all[rows, cur])
    return cur, sampler.sample_probs(p)


def path_nodes(tree: StepTree, node: Tensor) -> tuple[Tensor, Tensor]:
    """Root-to-node indices, ascending and padded with 0: (keep (B, M), counts (B,))."""
    anc = tree.batched("mask")[torch.arange(node.shape[0], device=node.device), node]  # (B, W)
    counts = anc.sum(1)
    width = anc.shape[1]
    idx = torch.arange(width, device=node.device).expand_as(anc)
    keep = torch.where(anc, idx, torch.full_like(idx, width)).sort(1).values[:, : int(counts.max())]
    return torch.where(keep < width, keep, torch.zeros_like(keep)), counts
