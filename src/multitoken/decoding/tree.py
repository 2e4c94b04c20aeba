"""Tree verification: the tutorial's "parallel decoding", done in one forward pass.

The MTP heads propose, at the last committed position, a top-k list of candidates for each
future offset: head j's candidates are guesses for the token j places after the pending
token. A *tree* picks which combinations to check: a node at depth d is a path
``[r_1, .., r_d]`` = rank r_1 of head 1, then rank r_2 of head 2, ... (Medusa's
"choices"). The root (node 0, depth 0) is the pending token, which is already emitted.

One ``model.verify`` pass scores the whole flattened tree with a tree attention mask
(each node sees the committed prefix, its ancestors and itself; its position is the
prefix length + its depth). Then

* greedy: the deepest node whose every token equals the base argmax at its parent wins;
  its path plus the bonus token (the base argmax at that node) are emitted, so the output
  is token-identical to plain greedy decoding;
* sampling (lossless, nodes are deterministic so q is one-hot): at each node try the
  children in rank order, accepting child x with probability p(x) / (remaining mass of p);
  a rejected child's token is zeroed out of p; if every child is rejected the next token
  is sampled from what is left of p; at a leaf it is sampled from p itself.

``model.accept`` then commits the chosen root-to-node path, moving its KV entries into
contiguous cache slots. Trees are static (a list of paths: a preset, user-given, or tuned
by :func:`tune_tree` and saved as ``tree.json`` next to the model) or dynamic (rebuilt
every step, per batch row, from the heads' probabilities up to a node budget).

Nodes are stored in topological order (every parent before its children), so the node
indices along any root-to-node path ascend, as ``accept`` requires.
"""
from __future__ import annotations

import heapq
import json
import numbers
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from multitoken.decoding.generate import GenerationStats, _Tracker, _as_rows, _capacity, _device_of, _fit_context, prefill
from multitoken.model.protocol import MTPDecoderModel
from multitoken.decoding.sampling import Sampler

TREE_FILE = "tree.json"

TreePath = tuple[int, ...]  # one node: the top-k rank chosen at each depth

# ----------------------------------------------------------------------------- representation


def validate_tree(paths, num_heads: int | None = None) -> list[TreePath]:
    """Check a static tree and return its paths as tuples in (depth, path) order.

    paths: iterable of non-empty sequences of non-negative ints. Every path's parent
    (the path minus its last rank) must be present, no path may repeat, and no path may
    be deeper than ``num_heads`` (the model's draft heads). Raises ValueError otherwise.
    """
    if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise ValueError(f"a tree is a list of paths such as [[0], [1], [0, 0]], got {paths!r}")
    out: list[TreePath] = []
    seen: set[TreePath] = set()
    for p in paths:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise ValueError(f"tree path {p!r} is not a list of top-k ranks")
        t = tuple(p)
        if not t:
            raise ValueError("empty tree path: the root (the pending token) is implicit, list only draft nodes")
        for r in t:
            if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
                raise ValueError(f"tree path {list(p)!r}: ranks must be non-negative integers")
        t = tuple(int(r) for r in t)
        if t in seen:
            raise ValueError(f"tree path {list(t)} appears twice")
        seen.add(t)
        out.append(t)
    if not out:
        raise ValueError("a tree needs at least one path, e.g. [[0]]")
    for t in out:
        if len(t) > 1 and t[:-1] not in seen:
            raise ValueError(f"tree path {list(t)} has no parent: add {list(t[:-1])}")
        if num_heads is not None and len(t) > num_heads:
            raise ValueError(f"tree path {list(t)} has depth {len(t)}, but the model has only {num_heads} "
                             f"draft head{'s' if num_heads != 1 else ''}")
    return sorted(out, key=lambda t: (len(t), t))


@dataclass(frozen=True, eq=False)
class FlatTree:
    """A static tree flattened for one verify pass; node 0 is the root (pending token).

    W = len(paths) + 1 nodes. Node i >= 1 is ``paths[i - 1]``; its token is rank
    ``ranks[i]`` of head ``heads[i]`` (= its depth).
    """

    paths: tuple[TreePath, ...]
    mask: Tensor  # (W, W) bool: mask[i, j] = node i attends to node j (its ancestors and itself)
    depths: Tensor  # (W,) long: 0 for the root; a node's position is prefix length + depth
    parents: Tensor  # (W,) long: parent node index, -1 for the root
    heads: Tensor  # (W,) long: draft head whose candidate the node is (= depth; 0 = root)
    ranks: Tensor  # (W,) long: rank in that head's top-k (-1 for the root)

    @property
    def width(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """Candidates needed per head (largest rank + 1)."""
        return max(max(p) for p in self.paths) + 1

    def truncated(self, max_depth: int) -> "FlatTree | None":
        """The same tree without nodes deeper than ``max_depth`` (None if nothing is left)."""
        if max_depth >= self.max_depth:
            return self
        kept = [p for p in self.paths if len(p) <= max_depth]
        return flatten_tree(kept) if kept else None


def flatten_tree(paths, num_heads: int | None = None) -> FlatTree:
    """Validate ``paths`` and flatten them: mask, depths, parents, per-node (head, rank).

    >>> t = flatten_tree([[0], [1], [0, 0]])
    >>> t.parents.tolist(), t.depths.tolist()
    ([-1, 0, 0, 1], [0, 1, 1, 2])
    """
    ordered = validate_tree(paths, num_heads)
    index = {(): 0}
    parents, depths, ranks = [-1], [0], [-1]
    for i, p in enumerate(ordered, start=1):
        index[p] = i
        parents.append(index[p[:-1]])
        depths.append(len(p))
        ranks.append(p[-1])
    parents_t = torch.tensor(parents)
    depths_t = torch.tensor(depths)
    return FlatTree(tuple(ordered), _ancestor_mask(parents_t[None])[0], depths_t, parents_t, depths_t.clone(),
                    torch.tensor(ranks))


def _ancestor_mask(parents: Tensor) -> Tensor:
    """(B, W) parent indices (topological order; -1 = root or padding) -> (B, W, W) bool
    mask of ancestors and self. A node with parent -1 sees only itself."""
    batch, width = parents.shape
    mask = torch.zeros(batch, width, width, dtype=torch.bool, device=parents.device)
    rows = torch.arange(batch, device=parents.device)
    mask[:, 0, 0] = True
    for i in range(1, width):
        par = parents[:, i]
        mask[:, i] = mask[rows, par.clamp(min=0)] & (par >= 0)[:, None]
        mask[:, i, i] = True
    return mask


# ----------------------------------------------------------------------------- presets and tuning

# Acceptance prior for presets and the verify-cost benchmark: P(rank r of head j is the
# base's token) ~ a_j * b_r, shaped like published Medusa/EAGLE head statistics (top-1 of
# head 1 right about 60% of the time, later heads and lower ranks much less).
_PRIOR_HEAD = (0.6, 0.4, 0.28, 0.2)
_PRIOR_RANK = (1.0, 0.25, 0.12, 0.08, 0.06, 0.05, 0.04, 0.03)


def prior_acceptance(num_heads: int, top_k: int = 8) -> Tensor:
    """(num_heads, top_k) generic acceptance table used to build the presets."""
    heads = [_PRIOR_HEAD[j] if j < len(_PRIOR_HEAD) else _PRIOR_HEAD[-1] * 0.7 ** (j - len(_PRIOR_HEAD) + 1)
             for j in range(num_heads)]
    ranks = [_PRIOR_RANK[r] if r < len(_PRIOR_RANK) else _PRIOR_RANK[-1] * (len(_PRIOR_RANK) / (r + 1)) ** 1.5
             for r in range(top_k)]
    return torch.tensor(heads, dtype=torch.float64)[:, None] * torch.tensor(ranks, dtype=torch.float64)[None, :]


# name -> number of draft nodes; "chain" is plain self-speculative decoding as a tree.
TREE_PRESETS: dict[str, int | None] = {"chain": None, "small": 8, "medium": 16, "large": 32}
DEFAULT_PRESET = "medium"


def tree_preset(name: str, num_heads: int) -> list[list[int]]:
    """Paths of a named preset for a model with ``num_heads`` draft heads.

    ``chain``: the top-1 chain (same as mode="spec"); ``small`` / ``medium`` / ``large``:
    8 / 16 / 32 nodes built by :func:`build_tree` from a generic acceptance prior, e.g.
    ``small`` for 3 heads is [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [3]].
    """
    if name not in TREE_PRESETS:
        raise ValueError(f"unknown tree preset {name!r}; presets: {', '.join(TREE_PRESETS)}")
    if num_heads < 1:
        raise ValueError("tree decoding needs a model with at least one draft head (n_future >= 2)")
    budget = TREE_PRESETS[name]
    if budget is None:
        return [[0] * d for d in range(1, num_heads + 1)]
    return build_tree(prior_acceptance(num_heads, budget), budget)


def expected_accept_length(paths, acc) -> float:
    """Expected tokens per verify pass (τ, bonus included) of a static tree when rank r of
    head j is right with probability acc[j-1][r] independently: 1 + Σ_nodes Π_path acc."""
    acc = torch.as_tensor(acc, dtype=torch.float64)
    total = 1.0
    for p in validate_tree(paths):
        if len(p) > acc.shape[0] or max(p) >= acc.shape[1]:
            continue  # no measurement for that node: count it as never accepted
        total += float(torch.prod(torch.stack([acc[j, r] for j, r in enumerate(p)])))
    return total


def build_tree(acc, budget: int) -> list[list[int]]:
    """Medusa's recipe: greedily add the node with the largest expected contribution
    (product of the acceptance probabilities along its path) until ``budget`` nodes.

    acc: (num_heads, top_k) with acc[j][r] = P(rank r of head j+1 equals the base's token).
    Nodes whose contribution is 0 are never added, so the tree may be smaller.
    Returns the paths in (depth, path) order.
    """
    acc = torch.as_tensor(acc, dtype=torch.float64)
    if acc.dim() != 2 or acc.numel() == 0:
        raise ValueError(f"acceptance table must be (num_heads, top_k), got shape {tuple(acc.shape)}")
    if not isinstance(budget, numbers.Integral) or budget < 1:
        raise ValueError(f"tree budget must be an integer >= 1, got {budget!r}")
    num_heads, top_k = acc.shape
    a = acc.clamp(0, 1).tolist()
    # Ranks in the table need not be sorted (measured acceptance of rank 1 may beat rank 0),
    # so expand every child of a chosen node; the heap holds (-score, path).
    heap: list[tuple[float, TreePath]] = [(-a[0][r], (r,)) for r in range(top_k)]
    heapq.heapify(heap)
    chosen: list[TreePath] = []
    while heap and len(chosen) < budget:
        neg, path = heapq.heappop(heap)
        if -neg <= 0:
            break
        chosen.append(path)
        if len(path) < num_heads:
            for r in range(top_k):
                heapq.heappush(heap, (neg * a[len(path)][r], path + (r,)))
    if not chosen:
        chosen = [(0,)]
    return [list(p) for p in sorted(chosen, key=lambda t: (len(t), t))]


def parse_tree(spec, num_heads: int | None = None) -> list[list[int]]:
    """A tree from user input: a preset name, a JSON list of paths, a list of paths, or the
    path of a ``tree.json`` file / a model folder holding one."""
    if isinstance(spec, FlatTree):
        return [list(p) for p in spec.paths]
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec).strip()
        if text in TREE_PRESETS:
            if num_heads is None:
                raise ValueError("a tree preset needs the model's number of draft heads")
            return tree_preset(text, num_heads)
        if text.startswith("["):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"tree is not valid JSON: {e}") from None
        elif Path(text).exists():
            paths = load_tree(text)
            if paths is None:
                raise ValueError(f"no {TREE_FILE} in {text}")
            spec = paths
        else:
            raise ValueError(f"unknown tree {text!r}: give a preset ({', '.join(TREE_PRESETS)}), a JSON list of "
                             f"paths such as [[0],[1],[0,0]], or a {TREE_FILE} file")
    return [list(p) for p in validate_tree(spec, num_heads)]


def _tree_file(model_dir) -> Path:
    p = Path(model_dir)
    return p if p.suffix == ".json" else p / TREE_FILE


def save_tree(paths, model_dir, acceptance=None, **meta) -> Path:
    """Write ``tree.json`` (paths, node count, optional acceptance table and extra fields)
    into ``model_dir`` atomically; returns the file."""
    ordered = validate_tree(paths)
    record = {"paths": [list(p) for p in ordered], "num_nodes": len(ordered)}
    if acceptance is not None:
        acc = torch.as_tensor(acceptance, dtype=torch.float64)
        record["acceptance"] = [[round(float(x), 6) for x in row] for row in acc]
        record["expected_tau"] = round(expected_accept_length(ordered, acc), 4)
    record.update(meta)
    path = _tree_file(model_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def load_tree(model_dir) -> list[list[int]] | None:
    """Paths saved by :func:`save_tree` in ``model_dir`` (or a tree.json path); None if there
    is no such file. A corrupt file raises ValueError."""
    path = _tree_file(model_dir)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        paths = record["paths"] if isinstance(record, dict) else record
        return [list(p) for p in validate_tree(paths)]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"corrupt tree file {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def resolve_tree(tree=None, model_dir=None, num_heads: int | None = None) -> list[list[int]]:
    """What ``--mode tree`` uses: an explicit ``tree`` (see :func:`parse_tree`), else the
    tree saved next to the model, else the default preset."""
    if tree is not None:
        return parse_tree(tree, num_heads)
    if model_dir is not None:
        saved = load_tree(model_dir)
        if saved is not None:
            return [list(p) for p in validate_tree(saved, num_heads)]
    if num_heads is None:
        raise ValueError("resolving the default tree needs the model's number of draft heads")
    return tree_preset(DEFAULT_PRESET, num_heads)


# ----------------------------------------------------------------------------- per-step trees


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


def _children(parents: list[int]) -> list[list[int]]:
    """Child lists per node. Both static (sorted paths) and dynamic (best-first) node orders
    list siblings in rank order, so children come out in rank order too."""
    kids: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents):
        if p >= 0:
            kids[p].append(i)
    return kids


def _step_tree_from_rows(rows: list[tuple[list[int], list[int], list[int]]], device) -> StepTree:
    """rows: per batch row (parents, depths, ranks) in topological order, root first."""
    width = max(len(p) for p, _, _ in rows)
    # Pad in Python and convert once: per-row tensor building dominates large batches.
    pad = lambda xs, v: xs + [v] * (width - len(xs))  # noqa: E731
    kids = [_children(p) for p, _, _ in rows]
    fan = max(1, max(len(k) for ks in kids for k in ks))
    children = [[k + [-1] * (fan - len(k)) for k in ks] + [[-1] * fan] * (width - len(ks)) for ks in kids]
    parents = torch.tensor([pad(p, -1) for p, _, _ in rows], dtype=torch.long)
    depths = torch.tensor([pad(d, 0) for _, d, _ in rows], dtype=torch.long)
    ranks = torch.tensor([pad(r, -1) for _, _, r in rows], dtype=torch.long)
    mask = _ancestor_mask(parents)
    nodes = torch.tensor([len(p) for p, _, _ in rows])
    return StepTree(mask.to(device), depths.to(device), parents.to(device), depths.to(device).clone(),
                    ranks.to(device), torch.tensor(children, dtype=torch.long).to(device), nodes.to(device))


def static_step_tree(tree: FlatTree, batch: int, device) -> StepTree:
    """Every row uses the same static tree: the mask and depths stay (W, W) and (W,)."""
    parents, ranks = tree.parents.tolist(), tree.ranks.tolist()
    one = _step_tree_from_rows([(parents, tree.depths.tolist(), ranks)], device)
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
    return _step_tree_from_rows([dynamic_tree_nodes(row, budget) for row in probs.tolist()], probs.device)


def root_only_tree(batch: int, device) -> StepTree:
    """No drafts (a plain step): the tree is the pending token alone."""
    return _step_tree_from_rows([([-1], [0], [-1])] * batch, device)


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


# ----------------------------------------------------------------------------- choosing a path

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


# ----------------------------------------------------------------------------- the decode loop


def _resolve_static(tree, model) -> FlatTree:
    heads = model.n_future - 1
    if isinstance(tree, FlatTree):
        flat = flatten_tree(tree.paths, heads)
    else:
        flat = flatten_tree(resolve_tree(tree, None, heads), heads)
    if flat.top_k > model.vocab_size:
        raise ValueError(f"tree uses rank {flat.top_k - 1}, but the vocabulary has only {model.vocab_size} tokens")
    return flat


def tree_decode(model: MTPDecoderModel, rows: list[Tensor], sampler: Sampler, tracker: _Tracker,
                stats: GenerationStats, tree=None, budget: int | None = None,
                child_rule: ChildRule | None = None) -> None:
    """Tree-verified self-speculative decoding of a batch (called by ``generate(mode="tree")``).

    tree: static tree (paths, preset name, JSON, tree.json/model folder, or FlatTree); None
    with ``budget`` None means the default preset. budget: build a dynamic tree of at most
    this many draft nodes per row each step instead (ranked by the product of the heads'
    softmax probabilities, warped like the target when sampling). Trees are cut to the
    tracker's draft depth (num_draft) and to what the rows may still emit.
    child_rule: acceptance rule for sampling (tests inject wrong ones).
    Fills ``stats.forward_passes`` and ``stats.tree_nodes_per_step`` (mean real nodes per
    verify pass per active row, root included); the tracker collects per-depth acceptance
    and the accepted-depth histogram.
    """
    if tree is not None and budget is not None:
        raise ValueError("give either a static tree or a dynamic tree budget, not both")
    rule = child_rule if child_rule is not None else lossless_child_rule
    batch, device = len(rows), rows[0].device
    k = len(tracker.accepted)  # draft depth limit (num_draft)
    if budget is not None:
        if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
            raise ValueError(f"tree budget must be an integer >= 1, got {budget!r}")
        reachable = sum(model.vocab_size ** d for d in range(1, k + 1))  # nodes a tree of depth k can have
        static, width_max = None, min(int(budget), reachable) + 1
    else:
        static = _resolve_static(tree, model).truncated(k)
        width_max = static.width
    state = model.new_state(batch, _capacity(rows, tracker.max_new, width_max + model.n_future + 2))
    last_logits = prefill(model, state, rows)
    stats.forward_passes += 1
    tracker.row_passes += batch
    pending = sampler.choose(last_logits)  # (B,) emitted, not yet in the cache
    for b in range(batch):
        tracker.emit(b, [int(pending[b])])
    step_trees: dict[int, StepTree | None] = {}  # static tree per depth limit
    node_sum, node_steps = 0, 0
    while not tracker.all_done:
        active = tracker.active(device)
        # Never draft deeper than any active row may still emit, nor past the context.
        room = max(tracker.max_new - len(tracker.out[b]) for b in range(batch) if not tracker.done[b])
        depth = max(0, min(k, room - 1, model.max_seq_len - int(state.lengths.max()) - 1))
        step, candidates = None, None
        if depth > 0:
            if static is not None:
                if depth not in step_trees:
                    cut = static.truncated(depth)
                    step_trees[depth] = None if cut is None else static_step_tree(cut, batch, device)
                step = step_trees[depth]
                if step is not None:
                    _, draft_logits = model.draft(state, pending, step.max_depth, lambda lg, j: lg.argmax(-1))
                    top = static.top_k
                    candidates = draft_logits.topk(top, dim=-1).indices  # (B, d, K)
            else:
                _, draft_logits = model.draft(state, pending, depth, lambda lg, j: lg.argmax(-1))
                top = min(int(budget), model.vocab_size)
                probs = draft_logits.softmax(-1) if sampler.greedy else sampler.probs(draft_logits)
                values, candidates = probs.topk(top, dim=-1)  # (B, d, K) descending
                step = dynamic_step_tree(values, int(budget))
                if step.max_depth == 0:
                    step, candidates = None, None
        if step is None:
            step = root_only_tree(batch, device)
        tokens = tree_tokens(step, pending, candidates)  # (B, W)
        logits = model.verify(state, tokens, step.mask, step.depths)  # (B, W, V)
        stats.forward_passes += 1
        if sampler.greedy:
            node, nxt = greedy_path(step, tokens, logits)
        else:
            node, nxt = sample_path(step, tokens, logits, sampler, rule)
        keep, counts = path_nodes(step, node)
        # Finished rows commit nothing, so their caches stop growing.
        model.accept(state, keep, torch.where(active, counts, torch.zeros_like(counts)))
        path_tokens = tokens.gather(1, keep).tolist()
        counts_l, nxt_l, nodes_l = counts.tolist(), nxt.tolist(), step.nodes.tolist()
        has_kids = (step.children[torch.arange(batch, device=device), node, 0] >= 0).tolist()
        drafted_tree = step.max_depth > 0
        for b in range(batch):
            if tracker.done[b]:
                continue
            tracker.row_passes += 1
            node_sum += nodes_l[b]
            node_steps += 1
            accepted = counts_l[b] - 1
            if drafted_tree:
                tracker.record(b, accepted, accepted + int(has_kids[b]))
            tracker.emit(b, path_tokens[b][1: counts_l[b]] + [nxt_l[b]])
        pending = nxt
    stats.tree_nodes_per_step = node_sum / node_steps if node_steps else 0.0


# ----------------------------------------------------------------------------- tuning


@torch.no_grad()
def measure_topk_acceptance(model: MTPDecoderModel, prompts, num_draft: int | None = None, top_k: int = 8,
                            max_new_tokens: int = 64, batch_size: int = 16) -> Tensor:
    """P(base greedy token == rank-r candidate of head j), measured along greedy decoding.

    For every prompt, decode ``max_new_tokens`` greedily (``batch_size`` prompts at a time;
    prompts too long for the context lose their oldest tokens); at each step record heads
    1..k's top_k candidates (drafted with argmax picks, as tree decoding does) and compare
    head j's candidates with the greedy token j places after the pending token.
    Returns acc (k, top_k) float64; acc[j-1, r] for head j, rank r.
    """
    heads = model.n_future - 1
    k = heads if num_draft is None else num_draft
    if not 1 <= k <= heads:
        raise ValueError(f"num_draft must be in [1, {heads}] for this model, got {k}")
    if not 1 <= top_k <= model.vocab_size:
        raise ValueError(f"top_k must be in [1, vocab_size={model.vocab_size}], got {top_k}")
    if max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be >= 2 to measure acceptance, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    rows = _fit_context(_as_rows(prompts, device), model, max_new_tokens, "left")
    hits = torch.zeros(k, top_k, dtype=torch.float64)
    totals = torch.zeros(k, dtype=torch.float64)
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size]
            state = model.new_state(len(chunk), _capacity(chunk, max_new_tokens, 2))
            pending = prefill(model, state, chunk).argmax(-1)
            generated, cands = [pending], []
            for _ in range(max_new_tokens - 1):
                _, draft_logits = model.draft(state, pending, k, lambda lg, j: lg.argmax(-1))
                cands.append(draft_logits.topk(top_k, dim=-1).indices)  # (B, k, K)
                pending = model.verify(state, pending[:, None])[:, 0].argmax(-1)
                model.accept(state, None, torch.ones_like(pending))
                generated.append(pending)
            gen = torch.stack(generated, 1)  # (B, N): gen[:, s] is the pending token at step s
            for s, cand in enumerate(cands):
                for j in range(1, min(k, gen.shape[1] - 1 - s) + 1):  # head j at step s guesses gen[:, s + j]
                    hits[j - 1] += (cand[:, j - 1] == gen[:, s + j, None]).sum(0).double().cpu()
                    totals[j - 1] += gen.shape[0]
    return hits / totals.clamp(min=1)[:, None]


def tune_tree(model: MTPDecoderModel, prompts, budget: int, num_draft: int | None = None, top_k: int | None = None,
              max_new_tokens: int = 64, batch_size: int = 16) -> list[list[int]]:
    """Measure per-head top-k acceptance on ``prompts`` and build the static tree of at most
    ``budget`` nodes that maximises the expected accepted length (Medusa's recipe).
    top_k defaults to min(budget, 10). For the table as well, call
    :func:`measure_topk_acceptance` and :func:`build_tree` yourself."""
    if not isinstance(budget, numbers.Integral) or isinstance(budget, bool) or budget < 1:
        raise ValueError(f"tree budget must be an integer >= 1, got {budget!r}")
    top_k = min(top_k or min(budget, 10), model.vocab_size)
    acc = measure_topk_acceptance(model, prompts, num_draft, top_k, max_new_tokens, batch_size)
    return build_tree(acc, budget)


# ----------------------------------------------------------------------------- verify cost


@torch.no_grad()
def verify_cost_by_width(model: MTPDecoderModel, widths: Sequence[int], prefix_len: int = 128, repeats: int = 5,
                         batch_size: int = 1, seed: int = 0) -> list[dict]:
    """Seconds of one tree verify pass of W nodes (root included) over a committed prefix of
    ``prefix_len`` tokens, for W in widths: which node budget the hardware affords.

    The tree for W nodes is the prior-built tree of W - 1 draft nodes (so masks and depths
    look like real ones). Returns rows {"width", "seconds" (median), "min_seconds",
    "relative" (to the smallest width)} in the order given.
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"widths must be integers >= 1, got {widths}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    heads = max(model.n_future - 1, 1)
    trees = {w: flatten_tree(build_tree(prior_acceptance(heads, w), w - 1)) if w > 1 else None for w in widths}
    deepest = max(t.max_depth if t else 0 for t in trees.values())
    if prefix_len < 1 or prefix_len + deepest >= model.max_seq_len:
        raise ValueError(f"prefix_len must be in [1, {model.max_seq_len - deepest - 1}] for this model, got {prefix_len}")
    device = _device_of(model)
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, model.vocab_size, (batch_size, prefix_len), generator=gen).to(device)
    out = []
    with torch.inference_mode():
        state = model.new_state(batch_size, prefix_len + max(widths) + 1)
        model.verify(state, prefix)
        model.accept(state, None, torch.full((batch_size,), prefix_len, device=device))
        for w in widths:
            t = trees[w]
            block = torch.randint(0, model.vocab_size, (batch_size, w), generator=gen).to(device)
            mask = t.mask.to(device) if t else None
            depths = t.depths.to(device) if t else None
            times = []
            for i in range(repeats + 1):  # the first pass warms up
                _sync(device)
                start = time.perf_counter()
                model.verify(state, block, mask, depths)  # nothing is accepted: the cache is unchanged
                _sync(device)
                if i:
                    times.append(time.perf_counter() - start)
            out.append({"width": w, "seconds": statistics.median(times), "min_seconds": min(times)})
    smallest = min(out, key=lambda r: r["width"])["seconds"]
    for r in out:
        r["relative"] = r["seconds"] / smallest if smallest > 0 else float("nan")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
