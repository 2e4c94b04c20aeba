"""Tree representation: a static tree is a list of paths, flattened for one verify pass.

A node at depth d is a path ``[r_1, .., r_d]`` = rank r_1 of head 1, then rank r_2 of
head 2, ... (Medusa's "choices"); the root (node 0, depth 0) is the pending token and is
implicit. Nodes are stored in topological order (every parent before its children), so
the node indices along any root-to-node path ascend, as ``model.accept`` requires.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from multitoken.errors import MultitokenError

TreePath = tuple[int, ...]  # one node: the top-k rank chosen at each depth


def validate_tree(paths, num_heads: int | None = None) -> list[TreePath]:
    """Check a static tree and return its paths as tuples in (depth, path) order.

    paths: iterable of non-empty sequences of non-negative ints. Every path's parent
    (the path minus its last rank) must be present, no path may repeat, and no path may
    be deeper than ``num_heads`` (the model's draft heads). Raises MultitokenError otherwise.
    """
    if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise MultitokenError(f"a tree is a list of paths such as [[0], [1], [0, 0]], got {paths!r}")
    out: list[TreePath] = []
    seen: set[TreePath] = set()
    for p in paths:
        if isinstance(p, (str, bytes)) or not hasattr(p, "__iter__"):
            raise MultitokenError(f"tree path {p!r} is not a list of top-k ranks")
        t = tuple(p)
        if not t:
            raise MultitokenError("empty tree path: the root (the pending token) is implicit, list only draft nodes")
        for r in t:
            if not isinstance(r, numbers.Integral) or isinstance(r, bool) or r < 0:
                raise MultitokenError(f"tree path {list(p)!r}: ranks must be non-negative integers")
        t = tuple(int(r) for r in t)
        if t in seen:
            raise MultitokenError(f"tree path {list(t)} appears twice")
        seen.add(t)
        out.append(t)
    if not out:
        raise MultitokenError("a tree needs at least one path, e.g. [[0]]")
    for t in out:
        if len(t) > 1 and t[:-1] not in seen:
            raise MultitokenError(f"tree path {list(t)} has no parent: add {list(t[:-1])}")
        if num_heads is not None and len(t) > num_heads:
            raise MultitokenError(f"tree path {list(t)} has depth {len(t)}, but the model has only {num_heads} "
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
    return FlatTree(tuple(ordered), ancestor_mask(parents_t[None])[0], depths_t, parents_t, depths_t.clone(),
                    torch.tensor(ranks))


def ancestor_mask(parents: Tensor) -> Tensor:
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
