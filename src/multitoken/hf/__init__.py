"""MTP heads on pretrained Hugging Face causal LMs: loading, the wrapper (with HF-style
``from_pretrained`` / ``generate``), heads files, hidden-state caches, base adaptation, and the
decode paths (lean forward and CPU kernels; the HF-forward fallback).

Importing this package does not import ``transformers`` or ``peft``: they load inside the
functions that need them (a missing one raises an error naming its ``pip install``).
"""
from multitoken.hf.adapt import BaseAdaptationError, adapt_base, cache_layer, run_top_layers, trainable_base_state
from multitoken.hf.heads_files import HeadsMismatchError
from multitoken.hf.hidden_cache import HiddenCache, base_hidden_and_greedy, build_hidden_cache, hidden_at_layer
from multitoken.hf.kernels import block_kernels, install_block_linears
from multitoken.hf.lean_forward import LeanDecoderForward, lean_forward_unsupported
from multitoken.hf.loading import (
    HFTokenizer, PretrainedError, apply_chat_template_or_fail, chat_ids, find_smollm2_gguf, load_base,
    load_causal_lm, load_smollm2, model_identity, resolve_dtype, smollm2_cache_dir,
)
from multitoken.hf.wrapper import (
    HF_HEAD_TYPES, DraftVocabHead, MTPHeadsForCausalLM, heads_config_for, load_heads_model,
)

__all__ = [
    "MTPHeadsForCausalLM", "load_heads_model", "load_base", "HFTokenizer", "HF_HEAD_TYPES", "HeadsMismatchError",
    "DraftVocabHead", "heads_config_for", "load_causal_lm", "load_smollm2", "find_smollm2_gguf",
    "smollm2_cache_dir", "apply_chat_template_or_fail", "chat_ids", "model_identity", "resolve_dtype",
    "PretrainedError", "HiddenCache", "build_hidden_cache", "base_hidden_and_greedy", "hidden_at_layer",
    "cache_layer", "run_top_layers", "adapt_base", "trainable_base_state", "BaseAdaptationError",
    "LeanDecoderForward", "lean_forward_unsupported", "block_kernels", "install_block_linears",
]
