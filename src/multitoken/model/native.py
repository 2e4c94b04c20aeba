"""The native MTP model: a GPT-style trunk (RoPE, RMSNorm, SwiGLU, GQA) plus MTP heads.

Architecture only. Training lives in :mod:`multitoken.training`; decoding algorithms live in
:mod:`multitoken.decoding` and reach this model only through the protocol methods
``new_state`` / ``verify`` / ``accept`` / ``crop`` / ``draft`` / ``select_rows`` (see :mod:`multitoken.model.protocol`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from multitoken.errors import MultitokenError
from multitoken.model.config import MTPConfig
from multitoken.model.heads import HeadsDecodeState, SharedModules, build_heads
from multitoken.model.layers import (
    Block, CommittedSequence, KVCache, PassContext, RMSNorm, RotaryEmbedding, causal_context,
)
from multitoken.model.protocol import ConfigDecoderAttributes, DraftPicker, check_row_index


@dataclass
class NativeDecodeState:
    cache: KVCache  # trunk keys/values
    heads: HeadsDecodeState  # committed tokens and hidden states, plus the head type's own caches

    @property
    def lengths(self) -> Tensor:
        return self.cache.lengths

    @property
    def capacity(self) -> int:
        return self.cache.capacity

    def select(self, index: Tensor) -> "NativeDecodeState":
        """The rows ``index`` (B',) long only, in that order (a copy)."""
        return NativeDecodeState(self.cache.select(index), self.heads.select(index))


def check_token_ids(tokens: Tensor, vocab_size: int) -> None:
    """Raise a clear error instead of an index crash deep inside the embedding."""
    if tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
    if tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = hi if hi >= vocab_size else lo
        raise MultitokenError(f"token id {bad} is out of range for vocab_size={vocab_size}")


class MTPModel(ConfigDecoderAttributes, nn.Module):
    """Shared trunk + ``n_future`` heads. Head 0 is the trunk's next-token head.

    ``model(tokens)`` with tokens (B, T) returns logits (B, T, n_future, V); head i at
    position t predicts token t+i+1 (``sequential`` heads are teacher-forced from tokens).
    """

    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.norm_eps)
                                    for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self._init_trunk()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # Built last: it initialises itself (zero-init residual branches) after the trunk's draws.
        self.heads = build_heads(cfg, SharedModules(self.lm_head, self.embed, self.rope))

    def _init_trunk(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # GPT-2 style: residual output projections scaled down with depth.
                scale = 1 / math.sqrt(2 * self.cfg.n_layer) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1
                nn.init.normal_(p, std=std * scale)

    def num_parameters(self) -> dict[str, int]:
        """Unique parameter counts of the trunk and of heads 1..n-1."""
        head_ids = {id(p) for p in self.heads.parameters()}
        trunk = sum(p.numel() for p in {id(p): p for p in self.parameters()}.values() if id(p) not in head_ids)
        heads = sum(p.numel() for p in self.heads.parameters())
        return {"trunk": trunk, "heads": heads, "total": trunk + heads}

    # ----------------------------------------------------------------- trunk
    def trunk(self, tokens: Tensor, ctx: PassContext, cache: KVCache | None = None) -> tuple[Tensor, Tensor]:
        """tokens (B, W) -> (h, z): h (B, W, d) trunk output before the final norm,
        z (B, W, d) the input of the last block (where ``transformer`` heads branch off)."""
        check_token_ids(tokens, self.cfg.vocab_size)
        x = self.embed(tokens)
        z = x
        for i, layer in enumerate(self.layers):
            z = x
            x = layer(x, ctx, cache, i)
        return x, z

    def head_hiddens(self, tokens: Tensor) -> list[Tensor]:
        """Teacher-forced pre-unembedding hidden states g_0..g_{n-1}, each (B, T, d)."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise MultitokenError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={self.cfg.max_seq_len}")
        ctx = causal_context(tokens.shape[0], tokens.shape[1], self.rope, tokens.device)
        h, z = self.trunk(tokens, ctx)
        hn = self.norm(h)
        return [hn] + self.heads.hiddens(hn, z, tokens)

    def head_logits(self, i: int, g: Tensor) -> Tensor:
        """Logits (..., V) of head i from its hidden g (..., d)."""
        return self.lm_head(g) if i == 0 else self.heads.unembed(i, g)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> logits (B, T, n_future, V)."""
        return torch.stack([self.head_logits(i, g) for i, g in enumerate(self.head_hiddens(tokens))], dim=2)

    # ----------------------------------------------------------------- decoding protocol
    def new_state(self, batch_size: int, capacity: int) -> NativeDecodeState:
        p = self.lm_head.weight
        cfg = self.cfg
        return NativeDecodeState(
            cache=KVCache(cfg.n_layer, batch_size, cfg.n_kv_head, cfg.head_dim, capacity, p.dtype, p.device),
            heads=self.heads.new_decode_state(CommittedSequence(batch_size, capacity, cfg.d_model, p.dtype, p.device)),
        )

    @torch.no_grad()
    def verify(self, state: NativeDecodeState, tokens: Tensor, tree_mask: Tensor | None = None,
               depths: Tensor | None = None) -> Tensor:
        ctx = state.cache.context_for(tokens.shape[1], self.rope, tree_mask, depths)
        h, z = self.trunk(tokens, ctx, state.cache)
        hn = self.norm(h)  # (B, W, d)
        self.heads.on_verify(state.heads, tokens, hn, z, ctx)
        return self.lm_head(hn).float()  # (B, W, V)

    @torch.no_grad()
    def accept(self, state: NativeDecodeState, keep: Tensor | None, counts: Tensor) -> None:
        state.cache.commit(keep, counts)
        self.heads.on_accept(state.heads, keep, counts)

    @torch.no_grad()
    def crop(self, state: NativeDecodeState, lengths: Tensor) -> None:
        state.cache.crop(lengths)
        self.heads.crop(state.heads, state.cache.lengths)

    def select_rows(self, state: NativeDecodeState, index: Tensor) -> NativeDecodeState:
        check_row_index(index, state.lengths.shape[0])
        return state.select(index.to(state.lengths.device))

    @torch.no_grad()
    def draft(self, state: NativeDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        self.check_num_draft(num_draft)
        return self.heads.draft(state.heads, next_tokens, num_draft, pick)
