"""Decoding: plain, self-speculative (chain), draft-model and tree-verified, batched, greedy or
lossless sampling, all driven by one step loop.

Modules: ``api`` (:func:`generate`, the public entry), ``loop`` (the step loop), ``chain``
(plain / self-speculative / draft-model steps), ``tree_verify`` (tree steps), ``tree_flat``
(tree representation), ``tree_presets`` (presets, builder, tree.json), ``tree_steps``
(per-step trees, path choice), ``tree_tuning`` (tune a tree), ``sampling``, ``draft_length``,
``cost`` (pass costs on this machine, calibration), ``cost_cache`` (calibrated once per model
and machine), ``defaults`` (the cost-aware draft length and tree), ``batch`` (helpers every
decoder shares), ``stats`` (what a decode reports, τ).
"""
from multitoken.decoding.api import MODE_ARGUMENTS, MODES, check_mode_arguments, generate
from multitoken.decoding.batch import TokenCallback
from multitoken.decoding.cost import CostModel, calibrate
from multitoken.decoding.cost_cache import cached_cost_model, cost_cache_dir
from multitoken.decoding.defaults import default_tree
from multitoken.decoding.draft_length import DraftLengthPolicy
from multitoken.decoding.sampling import Sampler, accept_chain
from multitoken.decoding.stats import GenerationResult, GenerationStats
from multitoken.decoding.tree_flat import FlatTree, flatten_tree, validate_tree
from multitoken.decoding.tree_presets import (
    DEFAULT_PRESET, TREE_FILE, TREE_PRESETS, build_tree, cost_aware_tree, expected_accept_length,
    attach_tree_hints, expected_chain_tau, load_tree, load_tree_acceptance, parse_tree, prior_acceptance, resolve_tree, save_tree,
    tree_preset,
)
from multitoken.decoding.tree_tuning import measure_topk_acceptance, tune_tree, tuning_top_k

__all__ = [
    "generate", "MODES", "MODE_ARGUMENTS", "check_mode_arguments",
    "GenerationResult", "GenerationStats", "TokenCallback", "Sampler", "accept_chain",
    "DraftLengthPolicy", "CostModel", "calibrate", "cached_cost_model", "cost_cache_dir", "default_tree",
    "cost_aware_tree", "load_tree_acceptance", "attach_tree_hints", "FlatTree", "flatten_tree", "validate_tree", "DEFAULT_PRESET",
    "TREE_FILE", "TREE_PRESETS",
    "build_tree", "expected_accept_length", "expected_chain_tau", "load_tree", "parse_tree", "prior_acceptance",
    "resolve_tree", "save_tree", "tree_preset", "measure_topk_acceptance", "tune_tree",
    "tuning_top_k",
]
