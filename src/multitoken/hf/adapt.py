"""Train the top of a Hugging Face base along with the MTP heads (Medusa-2 style), in full or with LoRA.

``adapt_base(base, layers=N)`` makes the last N decoder layers and the final norm trainable;
``adapt_base(base, layers=N, lora_rank=r)`` instead puts rank-r LoRA adapters (``peft``) on the
linear layers of those N layers and keeps every base weight frozen. Either way the layers below
stay frozen, so their output (the input of layer L-N) can be cached once like the final hidden
state is for frozen-base training, and :func:`run_top_layers` replays the trained layers on it.

An adapted base is a different model: decoding reproduces the *adapted* base's greedy output, and
head training keeps the base head's own cross-entropy against the original base's greedy tokens
in the loss so that it stays close to the original.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from multitoken.errors import MultitokenError
from multitoken.hf.loading import require_package
from multitoken.model.layers import document_mask


class BaseAdaptationError(MultitokenError):
    """The base cannot be adapted as asked (architecture, layer count, missing peft)."""


def decoder_stack(base: nn.Module) -> tuple[nn.ModuleList, nn.Module]:
    """(decoder layers, final norm) of a Llama-style HF causal LM (``base.model.layers/norm``);
    what training base layers and the lean decode forward (:mod:`multitoken.hf.lean_forward`) run."""
    inner = getattr(base, "model", None)
    layers, norm = getattr(inner, "layers", None), getattr(inner, "norm", None)
    if not isinstance(layers, nn.ModuleList) or norm is None or not hasattr(inner, "rotary_emb") \
            or not hasattr(inner, "embed_tokens"):
        raise BaseAdaptationError(f"{type(base).__name__} is not a Llama-style model "
                                  "(model.embed_tokens, model.layers, model.norm, model.rotary_emb)")
    return layers, norm


def adapt_base(base: nn.Module, layers: int, lora_rank: int = 0) -> int:
    """Make the top ``layers`` decoder layers of ``base`` trainable (LoRA when ``lora_rank`` > 0).
    Every other parameter is frozen. Returns the number of trainable base parameters."""
    stack, norm = decoder_stack(base)
    if not 1 <= layers <= len(stack):
        raise BaseAdaptationError(f"train_base_layers must be in [1, {len(stack)}] for this base, got {layers}")
    if lora_rank < 0:
        raise BaseAdaptationError(f"lora_rank must be >= 0, got {lora_rank}")
    for p in base.parameters():
        p.requires_grad_(False)
    top = range(len(stack) - layers, len(stack))
    if lora_rank:
        require_package("peft", "pip install peft")  # LoRA adapters
        from peft import LoraConfig, inject_adapter_in_model
        names = sorted({n.rsplit(".", 1)[-1] for i in top for n, m in stack[i].named_modules()
                        if isinstance(m, nn.Linear)})
        inject_adapter_in_model(LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                                           target_modules=names, layers_to_transform=list(top)), base)
        for n, p in base.named_parameters():
            p.requires_grad_("lora_" in n)
    else:
        for i in top:
            stack[i].requires_grad_(True)
        norm.requires_grad_(True)
    return sum(p.numel() for p in base.parameters() if p.requires_grad)


def cache_layer(base: nn.Module, layers: int) -> int | None:
    """Index of the hidden state to cache: the input of the first trained layer (None: the final
    post-norm hidden state, for a frozen base)."""
    return len(decoder_stack(base)[0]) - layers if layers else None


def run_top_layers(base: nn.Module, hidden: Tensor, layers: int, positions: Tensor | None = None) -> Tensor:
    """hidden (B, T, d) entering decoder layer L-``layers`` at positions 0..T-1 (or ``positions``
    (B, T) of packed documents, each attended to on its own) -> the final post-norm hidden state
    (B, T, d), through the (trainable) top layers, causal, no KV cache."""
    require_package("transformers", "pip install transformers")
    from transformers.masking_utils import create_causal_mask
    stack, norm = decoder_stack(base)
    if positions is None:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None].expand(hidden.shape[0], -1)
        mask = create_causal_mask(config=base.config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=positions)
    else:
        mask = document_mask(positions)
    rope = base.model.rotary_emb(hidden, position_ids=positions)
    for layer in stack[len(stack) - layers:]:
        out = layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rope)
        hidden = out[0] if isinstance(out, tuple) else out
    return norm(hidden)


def trainable_base_state(base: nn.Module) -> dict[str, Tensor]:
    """The trained base parameters (full top layers or LoRA adapters), by name."""
    return {n: p.detach() for n, p in base.named_parameters() if p.requires_grad}
