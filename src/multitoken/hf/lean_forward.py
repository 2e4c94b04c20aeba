"""A lean decode forward for Llama-family Hugging Face models, over a static KV cache.

Every verify pass of a wrapped base runs its decoder layers on a block of 1..16 new tokens.
Through ``base.model(...)`` each pass also pays Hugging Face's per-call machinery (mask
construction, output capture, ``DynamicCache`` concatenation of every layer's keys and
values, which copies the whole cache on every pass). This module runs the same weights of
the same model (norms, projections, MLP, the model's own rotary embedding) in the same order
with the same float operations, but writes keys and values into the preallocated
:class:`multitoken.model.layers.KVCache`, so a rollback is a length change and a tree accept moves
only the kept block entries. On a 2-core CPU, with the oneDNN kernels of
:mod:`multitoken.hf.kernels`, this took a 4-token SmolLM2-135M pass (decoder layers only) from
~59 ms to ~51 ms in a side-by-side timing (``bench/smollm2/NOTES.md`` §8; whole verify passes:
the verify-cost table of ``bench/smollm2/decode.md``); the hidden states were bitwise HF's
there, and match to float tolerance in the tests. It also calls fewer things per layer: stock
RMSNorms as their own operations, q/k/v and gate/up as one product each where oneDNN runs
(:class:`multitoken.hf.kernels.FusedBlockLinears`), ~1.5 ms less per SmolLM2 pass (NOTES §9).

Only architectures whose decoder layer is exactly Llama's (pre-norm attention with rotary
positions and grouped-query heads, then a pre-norm MLP) over full causal attention qualify;
:func:`lean_forward_unsupported` says why another one does not, and the wrapper then keeps
HF's forward and ``DynamicCache``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.hf.adapt import BaseAdaptationError, decoder_stack
from multitoken.hf.kernels import FusedBlockLinears
from multitoken.model.layers import KVCache, PassContext, block_attention_mask

LEAN_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_PARTS = ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")
_ATTN_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "scaling", "head_dim")
_MLP_PARTS = ("gate_proj", "up_proj", "down_proj", "act_fn")
_STOCK_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # weight * x * rsqrt(mean(x^2) + eps)
_SILU_MODULES = ("SiLUActivation", "SiLU")


def lean_forward_unsupported(base: nn.Module) -> str | None:
    """None if :class:`LeanDecoderForward` reproduces ``base``'s forward, else the reason why not."""
    cfg = base.config
    if cfg.model_type not in LEAN_MODEL_TYPES:
        return f"model_type {cfg.model_type!r} is not one of {', '.join(LEAN_MODEL_TYPES)}"
    try:
        layers, _ = decoder_stack(base)
    except BaseAdaptationError as e:
        return str(e)
    for layer in layers:
        if not all(hasattr(layer, a) for a in _LAYER_PARTS) or not all(hasattr(layer.self_attn, a) for a in _ATTN_PARTS):
            return f"decoder layer {type(layer).__name__} is not Llama-shaped"
    layer_types = getattr(cfg, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
            getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)):
        return "sliding-window attention"
    return None


class LeanDecoderForward:
    """Decode passes of a Llama-family base over a :class:`KVCache` (batch 1 or more rows)."""

    def __init__(self, base: nn.Module):
        reason = lean_forward_unsupported(base)
        if reason is not None:
            raise ValueError(f"no lean decode forward for this base: {reason}")
        self.model = base.model
        cfg = base.config
        attn = self.model.layers[0].self_attn
        self.n_head, self.n_kv_head = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = attn.head_dim
        # Each layer's parts as plain callables: fewer nn.Module calls per pass (a one-token pass
        # of SmolLM2 spends ~6 ms of its ~30 outside the matrix products, most of it in Python).
        self.layers = [_LayerParts(layer) for layer in self.model.layers]
        self.final_norm = norm_function(self.model.norm)

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
        return KVCache(len(self.model.layers), batch_size, self.n_kv_head, self.head_dim, capacity, dtype, device)

    def _context(self, x: Tensor, cache: KVCache, depths: Tensor, tree_mask: Tensor | None) -> PassContext:
        """Slots, positions and mask of a block appended after each row's committed prefix."""
        batch, width = x.shape[:2]
        kv_len = cache.slots_read(width)
        positions = cache.lengths[:, None] + depths.to(x.device).reshape(-1, width).expand(batch, width)  # (B, W)
        cos, sin = self.model.rotary_emb(x, positions)  # (B, W, Dh): the model's own rope (scaling included)
        slots = cache.lengths[:, None] + torch.arange(width, device=x.device)
        # Rows of one length need no mask for a one-token pass (every slot read is committed or
        # the token itself), and a whole prompt on an empty cache is plain causal. Rows of
        # different lengths always need one: a shorter row must not read a longer row's slots.
        uniform = bool((cache.lengths == cache.lengths[0]).all())
        fresh = uniform and int(cache.lengths[0]) == 0 and tree_mask is None
        mask = None if (uniform and width == 1) or fresh else block_attention_mask(cache.lengths, width, kv_len,
                                                                                     tree_mask)
        return PassContext(cos.unsqueeze(1), sin.unsqueeze(1), slots, mask, kv_len)

    def __call__(self, tokens: Tensor, cache: KVCache, depths: Tensor | None = None,
                 tree_mask: Tensor | None = None) -> Tensor:
        """tokens (B, W) at positions lengths + depths -> final-norm hidden states (B, W, d).

        Writes the block's keys/values as pending cache entries (``cache.commit`` keeps them).
        """
        batch, width = tokens.shape
        if depths is None:
            depths = torch.arange(width, device=tokens.device)
        x = self.model.embed_tokens(tokens)  # (B, W, d)
        ctx = self._context(x, cache, depths, tree_mask)
        causal = ctx.mask is None and width > 1
        for i, parts in enumerate(self.layers):
            q, k, v = parts.qkv(parts.input_norm(x))  # (B, W, H * Dh), (B, W, Hkv * Dh) x 2
            q = q.view(batch, width, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, W, Dh)
            k = k.view(batch, width, self.n_kv_head, self.head_dim).transpose(1, 2)
            v = v.view(batch, width, self.n_kv_head, self.head_dim).transpose(1, 2)
            q, k = ctx.rotate(q), ctx.rotate(k)
            keys, values = cache.write(i, k, v, ctx)  # (B, Hkv, S, Dh)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=ctx.mask, is_causal=causal,
                                                 scale=parts.scaling, enable_gqa=self.n_head != self.n_kv_head)
            x = x + parts.o_proj(out.transpose(1, 2).reshape(batch, width, -1))[0]
            x = x + parts.mlp(parts.post_norm(x))
        return self.final_norm(x)


class _LayerParts:
    """One Llama-shaped decoder layer as the callables a decode pass runs: its norms inlined
    where they are stock RMSNorms, q/k/v and gate/up fused (:class:`FusedBlockLinears`)."""

    def __init__(self, layer: nn.Module):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm, self.post_norm = norm_function(layer.input_layernorm), norm_function(layer.post_attention_layernorm)
        self.qkv = FusedBlockLinears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj, self.scaling = FusedBlockLinears([attn.o_proj]), attn.scaling
        self.mlp = mlp
        if all(hasattr(mlp, a) for a in _MLP_PARTS):
            self.gate_up, self.down = FusedBlockLinears([mlp.gate_proj, mlp.up_proj]), FusedBlockLinears([mlp.down_proj])
            self.act = F.silu if type(mlp.act_fn).__name__ in _SILU_MODULES else mlp.act_fn
            self.mlp = self._gated_mlp

    def _gated_mlp(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h)
        return self.down(self.act(gate) * up)[0]


def norm_function(norm: nn.Module):
    """A stock Llama/Mistral/Qwen2 RMSNorm as the same operations without the module call
    (bitwise its output on float32), any other norm as itself."""
    if type(norm).__name__ not in _STOCK_RMS_NORMS:
        return norm
    eps = norm.variance_epsilon

    def rms_norm(x: Tensor) -> Tensor:
        if x.dtype != torch.float32:
            return norm(x)
        return norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))
    return rms_norm
