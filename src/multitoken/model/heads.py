"""Prediction heads 1..n_future-1 (head 0 is always the trunk's own next-token head).

One class per head type behind one interface, :class:`Heads`; :data:`HEAD_CLASSES` maps each
``head_type`` to its class and :func:`build_heads` builds one. The native
:class:`~multitoken.model.native.MTPModel` and the Hugging Face wrapper use only the interface:

* training: ``hiddens(hn, z, tokens)`` -> teacher-forced hidden states g_1..g_{n-1}, each
  (B, T, d); ``unembed(i, g)`` turns g_i into logits.
* decoding: ``new_decode_state(seq)`` -> the head type's own decode state, which holds the
  owner's :class:`CommittedSequence`; ``on_verify`` / ``on_accept`` / ``crop`` keep it in
  lockstep with the owner's KV cache; ``draft`` gives the logits of heads 1..k at the last
  committed position (``sequential`` runs its modules as a chain).

The heads borrow the owner's unembedding, token embedding and rotary tables through
:class:`SharedModules`, handed over once at construction.

State-dict keys are the attribute names used below (``mlps``, ``step_embeddings``,
``transform``, ``blocks``, ``norms``, ``modules_``, ``out``): saved checkpoints and heads files
depend on them, and ``tests/model/test_heads.py`` pins them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import Tensor, nn

from multitoken.model.config import HEAD_TYPES, MTPConfig
from multitoken.model.layers import (
    Block, CommittedSequence, KVCache, PassContext, RMSNorm, RotaryEmbedding, causal_context, packed_context,
)
from multitoken.model.protocol import DraftPicker
from multitoken.model.targets import shift_tokens


@dataclass(eq=False)
class SharedModules:
    """What the heads borrow from the model that owns them. A plain object, not a Module, so the
    borrowed modules stay registered (and in the state dict) under their owner only."""

    lm_head: nn.Module  # the owner's unembedding (d -> V), shared unless the heads have their own `out`
    embed: nn.Module  # token embedding: `sequential` heads read the tokens ahead
    rope: RotaryEmbedding  # rotary tables of the attention heads (`transformer`, `sequential`)
    draft_lm_head: nn.Module | None = None  # unembedding used while drafting instead of lm_head (a draft vocabulary)


@dataclass
class HeadsDecodeState:
    """Decode state of the position-wise heads (linear, residual, modulated): what was committed."""

    seq: CommittedSequence  # the owner's committed tokens and final-norm hidden states

    def select(self, index: Tensor) -> "HeadsDecodeState":
        """The state of rows ``index`` (B',) long only, in that order (a copy)."""
        return replace(self, seq=self.seq.select(index))


@dataclass
class TransformerDecodeState(HeadsDecodeState):
    cache: KVCache | None = None  # one layer per head, in lockstep with the trunk (None: no heads)
    pending: Tensor | None = None  # (B, W, n-1, d) head outputs of the last verify
    last: Tensor | None = None  # (B, n-1, d) head outputs at the last committed position

    def select(self, index: Tensor) -> "TransformerDecodeState":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return replace(self, seq=self.seq.select(index), cache=None if self.cache is None else self.cache.select(index),
                       pending=pick(self.pending), last=pick(self.last))


@dataclass
class SequentialDecodeState(HeadsDecodeState):
    caches: list[KVCache] = field(default_factory=list)  # one per depth; depth j lags the trunk by j
    chain: Tensor | None = None  # (n-2, B, S, d) chain states h_1..h_{n-2} per position

    def select(self, index: Tensor) -> "SequentialDecodeState":
        return replace(self, seq=self.seq.select(index), caches=[c.select(index) for c in self.caches],
                       chain=None if self.chain is None else self.chain[:, index])


class ResidualMLP(nn.Module):
    """h + W2 act(W1 h); W2 starts at zero so a new head starts as the trunk's head."""

    def __init__(self, d_model: int, activation: str):
        super().__init__()
        self.up = nn.Linear(d_model, d_model, bias=False)
        self.down = nn.Linear(d_model, d_model, bias=False)
        self.act = nn.SiLU() if activation == "silu" else nn.GELU()

    def forward(self, h: Tensor) -> Tensor:
        return h + self.down(self.act(self.up(h)))


class SequentialModule(nn.Module):
    """DeepSeek-V3 MTP depth k: proj([norm(emb(x[t+k])); norm(h_{k-1})]) -> block -> own norm."""

    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.emb_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.hidden_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.norm_eps)
        self.out_norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, token_emb: Tensor, h_prev: Tensor, ctx: PassContext, cache: KVCache | None = None) -> Tensor:
        """token_emb, h_prev (B, W, d) -> h_k (B, W, d), the chain state (before out_norm)."""
        x = self.proj(torch.cat([self.emb_norm(token_emb), self.hidden_norm(h_prev)], dim=-1))
        return self.block(x, ctx, cache, 0)


class Heads(nn.Module):
    """Heads 1..n_future-1 of one head type (see DESIGN.md's table); subclasses add their modules
    in ``_build`` and their teacher-forced pass in ``_hiddens``."""

    head_type: str = ""

    def __init__(self, cfg: MTPConfig, shared: SharedModules):
        super().__init__()
        self.cfg, self.shared, self.n_extra = cfg, shared, cfg.n_future - 1
        if self.n_extra:  # n_future == 1: a plain LM, no head parameters at all
            self._build(cfg)
        # Registered after the type's own modules: init order (hence random draws) follows registration.
        self.out = None if cfg.share_embeddings or not self.n_extra else nn.ModuleList(
            nn.Linear(cfg.d_model, cfg.vocab_size, bias=False) for _ in range(self.n_extra))
        self.reset_parameters(cfg.init_std)

    def _build(self, cfg: MTPConfig) -> None:
        """Create the head type's modules (`linear` needs none but its own unembeddings)."""

    def reset_parameters(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            if isinstance(module, ResidualMLP):
                nn.init.zeros_(module.down.weight)

    def unembed(self, i: int, g: Tensor, drafting: bool = False) -> Tensor:
        """Logits (..., V) of head i >= 1 from its hidden g (..., d); ``drafting`` uses the
        owner's draft unembedding where it set one."""
        if self.out is not None:
            return self.out[i - 1](g)
        draft = self.shared.draft_lm_head
        return (draft if drafting and draft is not None else self.shared.lm_head)(g)

    # ----------------------------------------------------------------- training
    def hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, positions: Tensor | None = None) -> list[Tensor]:
        """Teacher-forced g_1..g_{n-1}, each (B, T, d).

        hn: (B, T, d) trunk final-norm hidden (lm_head input); z: (B, T, d) input of the
        trunk's last block (``transformer`` heads branch off there); tokens: (B, T);
        positions: (B, T) for rows of packed documents (:func:`packed_context`: heads that attend
        see their own document only), None for one sequence per row.
        """
        if not self.n_extra:
            return []
        batch, width = tokens.shape
        ctx = (causal_context(batch, width, self.shared.rope, tokens.device) if positions is None
               else packed_context(positions, self.shared.rope))
        return self._hiddens(hn, z, tokens, ctx)

    def _hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, ctx: PassContext) -> list[Tensor]:
        raise NotImplementedError

    # ----------------------------------------------------------------- decoding
    def new_decode_state(self, seq: CommittedSequence) -> HeadsDecodeState:
        """Empty head state for decoding next to ``seq`` (its batch, capacity, dtype, device)."""
        return HeadsDecodeState(seq)

    def _kv_cache(self, n_layers: int, seq: CommittedSequence) -> KVCache:
        batch, capacity = seq.tokens.shape
        return KVCache(n_layers, batch, self.cfg.n_kv_head, self.cfg.head_dim, capacity,
                       seq.hidden.dtype, seq.hidden.device)

    def on_verify(self, state: HeadsDecodeState, tokens: Tensor, hidden: Tensor,
                  z: Tensor | None = None, ctx: PassContext | None = None) -> None:
        """The owner ran a verify pass: tokens (B, W), final-norm hidden (B, W, d); z and ctx
        (the last block's input and the pass geometry) feed heads that read every position."""
        state.seq.stage(tokens, hidden)

    def on_accept(self, state: HeadsDecodeState, keep: Tensor | None, counts: Tensor) -> None:
        """Commit the same block positions the owner's cache commits (see the protocol's accept)."""
        state.seq.commit(keep, counts)

    def crop(self, state: HeadsDecodeState, lengths: Tensor) -> None:
        """Shorten the committed sequence (and head caches) to ``lengths`` (B,)."""
        state.seq.lengths = lengths.to(state.seq.lengths).clone()

    def draft(self, state: HeadsDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        """Drafts (B, k) and raw logits (B, k, V) of heads 1..k at each row's last committed
        position; next_tokens (B,) is the pending token after it."""
        raise NotImplementedError

    def _pick_each(self, hidden_of: Callable[[int], Tensor], num_draft: int,
                   pick: DraftPicker) -> tuple[Tensor, Tensor]:
        """Drafts and logits of heads 1..k whose hiddens do not depend on earlier drafts."""
        tokens, all_logits = [], []
        for i in range(1, num_draft + 1):
            logits = self.unembed(i, hidden_of(i), drafting=True).float()  # (B, V)
            all_logits.append(logits)
            tokens.append(pick(logits, i - 1))
        return torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1)


class PositionwiseHeads(Heads):
    """Heads whose g_i at position t reads only the trunk's final-norm hidden at t."""

    def head_hidden(self, i: int, hn: Tensor) -> Tensor:
        """g_i (..., d) from the trunk's final-norm hidden hn (..., d)."""
        raise NotImplementedError

    def _hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, ctx: PassContext) -> list[Tensor]:
        return [self.head_hidden(i, hn) for i in range(1, self.n_extra + 1)]

    def draft(self, state: HeadsDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        hn_last = state.seq.last_hidden()  # (B, d)
        return self._pick_each(lambda i: self.head_hidden(i, hn_last), num_draft, pick)


class LinearHeads(PositionwiseHeads):
    """Independent unembeddings Linear(d, V) on the trunk's hidden (Gloeckle et al. style)."""

    head_type = "linear"

    def head_hidden(self, i: int, hn: Tensor) -> Tensor:
        return hn


class ResidualHeads(PositionwiseHeads):
    """One zero-init residual MLP per head on the trunk's hidden, shared unembedding (Medusa style)."""

    head_type = "residual"

    def _build(self, cfg: MTPConfig) -> None:
        self.mlps = nn.ModuleList(ResidualMLP(cfg.d_model, cfg.head_activation) for _ in range(self.n_extra))

    def head_hidden(self, i: int, hn: Tensor) -> Tensor:
        return self.mlps[i - 1](hn)


class ModulatedHeads(PositionwiseHeads):
    """One shared residual MLP, told which head it is by a learned step embedding."""

    head_type = "modulated"

    def _build(self, cfg: MTPConfig) -> None:
        self.step_embeddings = nn.Parameter(torch.zeros(self.n_extra, cfg.d_model))
        self.transform = ResidualMLP(cfg.d_model, cfg.head_activation)

    def reset_parameters(self, std: float) -> None:
        super().reset_parameters(std)
        if self.n_extra:
            nn.init.normal_(self.step_embeddings, std=std)

    def head_hidden(self, i: int, hn: Tensor) -> Tensor:
        return self.transform(hn + self.step_embeddings[i - 1])


class TransformerHeads(Heads):
    """Parallel transformer blocks, each a sibling of the trunk's last block (reads its input z)."""

    head_type = "transformer"

    def _build(self, cfg: MTPConfig) -> None:
        d, n = cfg.d_model, self.n_extra
        self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.norm_eps) for _ in range(n))
        self.norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in range(n))

    def _hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, ctx: PassContext) -> list[Tensor]:
        return [norm(block(z, ctx)) for block, norm in zip(self.blocks, self.norms)]

    def new_decode_state(self, seq: CommittedSequence) -> TransformerDecodeState:
        return TransformerDecodeState(seq, self._kv_cache(self.n_extra, seq) if self.n_extra else None)

    def on_verify(self, state: TransformerDecodeState, tokens: Tensor, hidden: Tensor,
                  z: Tensor | None = None, ctx: PassContext | None = None) -> None:
        """Run every head block over the block (they read every position, like the trunk)."""
        super().on_verify(state, tokens, hidden, z, ctx)
        if self.n_extra:
            state.pending = torch.stack([norm(block(z, ctx, state.cache, i))
                                         for i, (block, norm) in enumerate(zip(self.blocks, self.norms))], dim=2)

    def on_accept(self, state: TransformerDecodeState, keep: Tensor | None, counts: Tensor) -> None:
        super().on_accept(state, keep, counts)
        if not self.n_extra:
            return
        state.cache.commit(keep, counts)
        rows = torch.arange(counts.shape[0], device=counts.device)
        last = counts - 1 if keep is None else keep[rows, counts - 1]
        state.last = state.pending[rows, last]  # (B, n-1, d)
        state.pending = None

    def crop(self, state: TransformerDecodeState, lengths: Tensor) -> None:
        super().crop(state, lengths)
        if self.n_extra:
            state.cache.crop(state.seq.lengths)
            state.last = None  # only valid right after an accept

    def draft(self, state: TransformerDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        return self._pick_each(lambda i: state.last[:, i - 1], num_draft, pick)


class SequentialHeads(Heads):
    """A chain of modules (DeepSeek-V3 MTP): depth k reads depth k-1's state and token t+k."""

    head_type = "sequential"

    def _build(self, cfg: MTPConfig) -> None:
        self.modules_ = nn.ModuleList(SequentialModule(cfg) for _ in range(self.n_extra))

    def _hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, ctx: PassContext) -> list[Tensor]:
        out, h = [], hn
        for k, module in enumerate(self.modules_, start=1):
            # Depth k at position t reads token t+k; past the end any id works (targets ignored).
            h = module(self.shared.embed(shift_tokens(tokens, k, 0)), h, ctx)
            out.append(module.out_norm(h))
        return out

    def new_decode_state(self, seq: CommittedSequence) -> SequentialDecodeState:
        batch, capacity, d = seq.hidden.shape
        chain = torch.zeros(max(self.n_extra - 1, 0), batch, capacity, d, dtype=seq.hidden.dtype,
                            device=seq.hidden.device)
        return SequentialDecodeState(seq, [self._kv_cache(1, seq) for _ in range(self.n_extra)], chain)

    def crop(self, state: SequentialDecodeState, lengths: Tensor) -> None:
        super().crop(state, lengths)
        # Depth j's entry at s read token s+j: keep it only if that token is still committed.
        for j, cache in enumerate(state.caches, start=1):
            cache.crop(torch.minimum(cache.lengths, (state.seq.lengths - j).clamp(min=0)))

    def draft(self, state: SequentialDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        """Run depths 1..k as a chain. Depth j's cache lags the trunk by j positions: its entry
        at position s reads token s+j, final once s+j <= L (L = committed length; token L is
        next_tokens). Each call first catches up the positions that became final, then
        computes position L-1 on drafted tokens; only final entries stay committed.
        """
        seq, rope, embed = state.seq, self.shared.rope, self.shared.embed
        batch = seq.lengths.shape[0]
        rows = torch.arange(batch, device=seq.lengths.device)
        length = seq.lengths  # (B,)
        # Extended tokens per row: committed, then next_tokens at L, then the drafts.
        ext = torch.cat([seq.tokens, torch.zeros(batch, num_draft + 1, dtype=torch.long, device=rows.device)], 1)
        ext[rows, length] = next_tokens
        drafts, logits_out = [], []
        for j in range(1, num_draft + 1):
            module, cache = self.modules_[j - 1], state.caches[j - 1]
            start = cache.lengths  # (B,)
            width = int((length - start).max())
            pos = start[:, None] + torch.arange(width, device=rows.device)  # (B, W)
            valid = pos < length[:, None]  # padded positions past L-1 are computed, then discarded
            pos_c = torch.minimum(pos, (length - 1)[:, None])
            prev = seq.hidden if j == 1 else state.chain[j - 2]  # h_{j-1} per position
            h_prev = prev[rows[:, None], pos_c]  # (B, W, d)
            tok = ext.gather(1, pos_c + j)  # token s+j
            ctx = cache.context_for(width, rope)
            h = module(embed(tok), h_prev.to(cache.k.dtype), ctx, cache)  # (B, W, d)
            if j - 1 < state.chain.shape[0]:
                r = rows[:, None].expand_as(pos)
                state.chain[j - 1][r[valid], pos[valid]] = h[valid].to(state.chain.dtype)
            last = h[rows, length - 1 - start]  # (B, d) at position L-1
            logits = self.unembed(j, module.out_norm(last), drafting=True).float()
            token = pick(logits, j - 1)
            ext[rows, length + j] = token
            drafts.append(token)
            logits_out.append(logits)
            cache.lengths = torch.maximum(start, (length - j + 1).clamp(min=0))  # keep final entries
        return torch.stack(drafts, dim=1), torch.stack(logits_out, dim=1)


HEAD_CLASSES: dict[str, type[Heads]] = {cls.head_type: cls for cls in (
    LinearHeads, ResidualHeads, ModulatedHeads, TransformerHeads, SequentialHeads)}
assert tuple(HEAD_CLASSES) == HEAD_TYPES, "every head type in config.HEAD_TYPES needs a class here"


def build_heads(cfg: MTPConfig, shared: SharedModules) -> Heads:
    """The heads of ``cfg.head_type`` for ``cfg.n_future``, borrowing ``shared`` from their owner."""
    return HEAD_CLASSES[cfg.head_type](cfg, shared)
