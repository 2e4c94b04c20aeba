"""What :func:`~multitoken.decoding.api.generate` does when not told: the cost-aware defaults.

* mode "spec" without ``draft_cost``: each step's draft length maximises expected tokens per
  second under the model's calibrated :class:`~multitoken.decoding.cost.CostModel`
  (:class:`~multitoken.decoding.draft_length.DraftLengthPolicy`); ``draft_cost`` instead sets
  the old linear cost, and with no cost model (``cost_model="off"``, or a weightless model)
  every step drafts ``num_draft``.
* mode "tree" without ``tree`` / ``tree_budget``: when the model offers a top-k acceptance table
  (``draft_acceptance``, :mod:`multitoken.model.protocol`) and a cost model is on, the Medusa
  tree of 1..15 nodes with the best expected τ per step cost at this batch size, chosen once
  per call and cut each step to the depth that pays from the running rate at which its levels
  are reached (as the chain sizes its drafts); else the model's saved tree (``draft_tree``);
  else the default preset.
* mode "tree" without ``prompt_lookup``: with a cost model, prompt-lookup chains of up to
  DEFAULT_LOOKUP tokens grafted onto the tree where the cost model says they pay
  (:mod:`multitoken.decoding.lookup`); without one, no lookup.
Every choice is verified by the base, so greedy output is plain decoding's whatever is chosen.
"""
from __future__ import annotations

import torch

from multitoken.decoding.cost import CostModel
from multitoken.decoding.cost_cache import resolve_cost_model
from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.decoding.lookup import DEFAULT_LOOKUP, check_lookup
from multitoken.decoding.tree_presets import DEFAULT_PRESET, cost_aware_tree
from multitoken.errors import MultitokenError
from multitoken.model.protocol import MTPDecoderModel, decode_hint

MAX_TREE_NODES = 15  # budgets the cost-aware tree tries: past ~16 nodes a CPU verify pass costs too much


def spec_policy(model: MTPDecoderModel, num_draft: int, batch: int, draft_cost: float | None,
                cost_model) -> tuple[DraftLengthPolicy | None, str]:
    """(the draft-length policy of mode "spec" / "draft", how it was chosen): ``draft_cost``
    given: the linear cost; else (spec only) the cost model; else None, fixed ``num_draft``."""
    if not num_draft:
        return None, "plain"
    if draft_cost is not None:
        return DraftLengthPolicy(num_draft, draft_cost), "draft_cost"
    cost = resolve_cost_model(model, cost_model)
    if cost is None:
        return None, "fixed"
    return DraftLengthPolicy(num_draft, cost_model=cost, batch=batch), "cost model"


def acceptance_table(model: MTPDecoderModel, num_draft: int) -> torch.Tensor | None:
    """The model's ``draft_acceptance`` cut to ``num_draft`` heads and its vocabulary, (k, top_k)
    float64; None when it offers none. A table of another shape raises MultitokenError."""
    acc = decode_hint(model, "draft_acceptance")
    if acc is None:
        return None
    acc = torch.as_tensor(acc, dtype=torch.float64).cpu()
    if acc.dim() != 2 or acc.numel() == 0:
        raise MultitokenError(f"the model's draft_acceptance must be (num_heads, top_k), got shape {tuple(acc.shape)}")
    return acc[:num_draft, : model.vocab_size]


def default_tree(model: MTPDecoderModel, num_draft: int, batch: int, cost_model) -> tuple[object, str]:
    """(the static tree of mode "tree" when none is given, how it was chosen); see the module docstring.
    The tree is paths or a preset name, for :class:`~multitoken.decoding.tree_verify.TreeStep`."""
    acc = acceptance_table(model, num_draft)
    cost: CostModel | None = resolve_cost_model(model, cost_model) if acc is not None else None
    if cost is not None:
        paths, _ = cost_aware_tree(acc, lambda width, depth: cost.step_cost(depth, batch, width), MAX_TREE_NODES)
        return paths, "cost-aware"
    saved = decode_hint(model, "draft_tree")
    if saved is not None:
        return [list(p) for p in saved], "saved"
    return DEFAULT_PRESET, "preset"


def lookup_setting(model: MTPDecoderModel, prompt_lookup: int | None, cost_model) -> tuple[int, CostModel | None]:
    """(the longest prompt-lookup chain of mode "tree", the cost model that sizes each step's
    chain or None): ``prompt_lookup`` None = DEFAULT_LOOKUP where a cost model is on, else 0;
    0 = off, without resolving (maybe calibrating) a cost model it would not use."""
    if prompt_lookup is not None and check_lookup(prompt_lookup) == 0:
        return 0, None
    cost = resolve_cost_model(model, cost_model)
    if prompt_lookup is None:
        return (DEFAULT_LOOKUP if cost is not None else 0), cost
    return prompt_lookup, cost
