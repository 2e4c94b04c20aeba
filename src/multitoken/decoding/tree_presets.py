"""Static trees: the acceptance prior, named presets, Medusa's tree builder, the expected
accepted length, and trees from user input or a ``tree.json`` saved next to the model."""
from __future__ import annotations

import heapq
import json
import numbers
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import Tensor

from multitoken.decoding.tree_flat import FlatTree, TreePath, validate_tree
from multitoken.errors import MultitokenError, first_line
from multitoken.io import read_json, write_json

TREE_FILE = "tree.json"

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


def tree_preset(name: str, num_heads: int, vocab_size: int | None = None) -> list[list[int]]:
    """Paths of a named preset for a model with ``num_heads`` draft heads.

    ``chain``: the top-1 chain (same as mode="spec"); ``small`` / ``medium`` / ``large``:
    8 / 16 / 32 nodes built by :func:`build_tree` from a generic acceptance prior, e.g.
    ``small`` for 3 heads is [[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [3]].
    With ``vocab_size``, the preset fits that vocabulary: built from ranks below it only (so
    a tiny vocabulary may give fewer nodes).
    """
    if name not in TREE_PRESETS:
        raise MultitokenError(f"unknown tree preset {name!r}; presets: {', '.join(TREE_PRESETS)}")
    if num_heads < 1:
        raise MultitokenError("tree decoding needs a model with at least one draft head (n_future >= 2)")
    budget = TREE_PRESETS[name]
    if budget is None:
        return [[0] * d for d in range(1, num_heads + 1)]
    top_k = budget if vocab_size is None else max(1, min(budget, vocab_size))
    return build_tree(prior_acceptance(num_heads, top_k), budget)


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


def expected_chain_tau(acc: Sequence[float]) -> float:
    """Expected τ of chain decoding whose draft position j is accepted with probability
    acc[j] (given the drafts before it were): 1 + Σ_j Π_{i<=j} acc[i]. The top-1 chain as
    a tree, so it is :func:`expected_accept_length` of that chain."""
    rates = [float(a) for a in acc]
    if not rates:
        return 1.0
    return expected_accept_length([[0] * d for d in range(1, len(rates) + 1)], [[a] for a in rates])


def build_tree(acc, budget: int) -> list[list[int]]:
    """Medusa's recipe: greedily add the node with the largest expected contribution
    (product of the acceptance probabilities along its path) until ``budget`` nodes.

    acc: (num_heads, top_k) with acc[j][r] = P(rank r of head j+1 equals the base's token).
    Nodes whose contribution is 0 are never added, so the tree may be smaller.
    Returns the paths in (depth, path) order.
    """
    acc = torch.as_tensor(acc, dtype=torch.float64)
    if acc.dim() != 2 or acc.numel() == 0:
        raise MultitokenError(f"acceptance table must be (num_heads, top_k), got shape {tuple(acc.shape)}")
    if not isinstance(budget, numbers.Integral) or budget < 1:
        raise MultitokenError(f"tree budget must be an integer >= 1, got {budget!r}")
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


def cost_aware_tree(acc, step_cost: Callable[[int, int], float],
                    max_budget: int = 15) -> tuple[list[list[int]], list[dict]]:
    """The static tree with the most expected tokens per cost: Medusa's tree (:func:`build_tree`)
    for each node budget 1..max_budget from the acceptance table ``acc`` (num_heads, top_k),
    scored by expected τ (:func:`expected_accept_length`) / ``step_cost(width, depth)`` (width:
    nodes + root, depth: the deepest path, what drafting it takes). Returns (paths, one row
    per distinct tree: {"nodes", "tau", "cost", "score"}); ties go to the smaller tree."""
    best, rows, seen = None, [], set()
    for budget in range(1, max_budget + 1):
        paths = build_tree(acc, budget)
        if len(paths) in seen:  # the table ran out of useful nodes: the same tree again
            continue
        seen.add(len(paths))
        tau = expected_accept_length(paths, acc)
        cost = step_cost(len(paths) + 1, max(len(p) for p in paths))
        score = tau / cost if cost > 0 else float("inf")
        rows.append({"nodes": len(paths), "tau": round(tau, 4), "cost": round(cost, 4), "score": round(score, 4)})
        if best is None or score > best[0]:
            best = (score, paths)
    return best[1], rows


def load_tree_acceptance(model_dir) -> Tensor | None:
    """The top-k acceptance table (num_heads, top_k) float64 that :func:`save_tree` recorded in
    ``model_dir``'s tree.json; None without the file or the table. A corrupt file raises MultitokenError."""
    path = tree_file(model_dir)
    if load_tree(model_dir) is None:  # also checks the file
        return None
    record = read_json(path, "tree file")
    acc = record.get("acceptance") if isinstance(record, dict) else None
    if acc is None:
        return None
    try:
        table = torch.tensor(acc, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise MultitokenError(f"corrupt tree file {path}: acceptance is not a table ({first_line(e)})") from None
    if table.dim() != 2 or table.numel() == 0:
        raise MultitokenError(f"corrupt tree file {path}: acceptance must be (num_heads, top_k), "
                              f"got shape {tuple(table.shape)}")
    return table


def parse_tree(spec, num_heads: int | None = None, vocab_size: int | None = None) -> list[list[int]]:
    """A tree from user input: a preset name (fitted to ``vocab_size`` when given, see
    :func:`tree_preset`), a JSON list of paths, a list of paths, or the path of a ``tree.json``
    file / a model folder holding one (those are taken as they are)."""
    if isinstance(spec, FlatTree):
        return [list(p) for p in spec.paths]
    if isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec).strip()
        if text in TREE_PRESETS:
            if num_heads is None:
                raise MultitokenError("a tree preset needs the model's number of draft heads")
            return tree_preset(text, num_heads, vocab_size)
        if text.startswith("["):
            try:
                spec = json.loads(text)
            except json.JSONDecodeError as e:
                raise MultitokenError(f"tree is not valid JSON: {e}") from None
        elif Path(text).exists():
            paths = load_tree(text)
            if paths is None:
                raise MultitokenError(f"no {TREE_FILE} in {text}")
            spec = paths
        else:
            raise MultitokenError(f"unknown tree {text!r}: give a preset ({', '.join(TREE_PRESETS)}), a JSON list of "
                             f"paths such as [[0],[1],[0,0]], or a {TREE_FILE} file")
    return [list(p) for p in validate_tree(spec, num_heads)]


def tree_file(model_dir) -> Path:
    """The tree file of a model folder (``<dir>/tree.json``), or ``model_dir`` itself if it names a .json file."""
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
    return write_json(tree_file(model_dir), record, indent=1)


def load_tree(model_dir) -> list[list[int]] | None:
    """Paths saved by :func:`save_tree` in ``model_dir`` (or a tree.json path); None if there
    is no such file. A corrupt file raises MultitokenError."""
    path = tree_file(model_dir)
    if not path.is_file():
        return None
    try:
        record = read_json(path, "tree file")
    except MultitokenError as e:
        if isinstance(e.__context__, json.JSONDecodeError):
            raise MultitokenError(f"corrupt {first_line(e)}") from None
        raise
    try:
        paths = record["paths"] if isinstance(record, dict) else record
        return [list(p) for p in validate_tree(paths)]
    except (KeyError, TypeError, MultitokenError) as e:
        raise MultitokenError(f"corrupt tree file {path}: {first_line(e)}") from None


def resolve_tree(tree=None, model_dir=None, num_heads: int | None = None,
                 vocab_size: int | None = None) -> list[list[int]]:
    """What ``--mode tree`` uses: an explicit ``tree`` (see :func:`parse_tree`), else the
    tree saved next to the model, else the default preset (fitted to ``vocab_size`` when given)."""
    if tree is not None:
        return parse_tree(tree, num_heads, vocab_size)
    if model_dir is not None:
        saved = load_tree(model_dir)
        if saved is not None:
            return [list(p) for p in validate_tree(saved, num_heads)]
    if num_heads is None:
        raise MultitokenError("resolving the default tree needs the model's number of draft heads")
    return tree_preset(DEFAULT_PRESET, num_heads, vocab_size)


def attach_tree_hints(model, model_dir) -> None:
    """Give ``model`` the decode hints of ``model_dir``'s tree.json (saved by tune-tree or heads
    training): ``draft_tree`` (its paths) and ``draft_acceptance`` (its top-k acceptance table), so
    ``generate(mode="tree")`` without a tree picks the same tree the CLI does. No file: both None."""
    model.draft_tree = load_tree(model_dir)
    model.draft_acceptance = load_tree_acceptance(model_dir)
