"""Prediction heads 1..n_future-1 (head 0 is always the trunk's own next-token head).

All head types share one interface, used both by the native :class:`MTPModel` and by
the Hugging Face wrapper:

* ``hiddens(...)``: teacher-forced pre-unembedding hidden states g_i (B, T, d) of heads
  1..n-1 (training, scoring); ``unembed(i, g, lm_head)`` turns them into logits.
* decoding: ``new_decode_state``, ``on_verify`` / ``on_accept`` (keep attention heads'
  KV caches in lockstep with the trunk's) and ``draft`` (logits of heads 1..k at the last
  committed position, with ``sequential`` running its modules as a chain).

The trunk owner keeps a :class:`CommittedSequence` (tokens and final-norm hidden states of
every committed position) that ``draft`` reads.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from multitoken.model.config import MTPConfig
from multitoken.model.layers import Block, KVCache, PassContext, RMSNorm, RotaryEmbedding, causal_context
from multitoken.model.protocol import DraftPicker
from multitoken.model.targets import shift_tokens


class CommittedSequence:
    """Per-row committed tokens and trunk hidden states (head inputs), plus the pending block.

    tokens (B, S) long, hidden (B, S, d): position s of row b is valid for s < lengths[b].
    """

    def __init__(self, batch_size: int, capacity: int, d_model: int, dtype, device):
        self.tokens = torch.zeros(batch_size, capacity, dtype=torch.long, device=device)
        self.hidden = torch.zeros(batch_size, capacity, d_model, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._pending: tuple[Tensor, Tensor] | None = None

    def stage(self, tokens: Tensor, hidden: Tensor) -> None:
        """Remember the block of the last verify pass: tokens (B, W), hidden (B, W, d)."""
        self._pending = (tokens, hidden)

    def commit(self, keep: Tensor | None, counts: Tensor) -> None:
        """Append block offsets keep[b, :counts[b]] (None = a prefix) to each row."""
        tokens, hidden = self._pending
        batch, width = tokens.shape
        if keep is None:
            keep = torch.arange(width, device=tokens.device).expand(batch, width)
        valid = torch.arange(keep.shape[1], device=keep.device)[None, :] < counts[:, None]  # (B, M)
        rows = torch.arange(batch, device=keep.device)[:, None].expand_as(keep)
        dst = self.lengths[:, None] + torch.arange(keep.shape[1], device=keep.device)
        self.tokens[rows[valid], dst[valid]] = tokens.gather(1, keep)[valid]
        self.hidden[rows[valid], dst[valid]] = hidden[rows[valid], keep[valid]].to(self.hidden.dtype)
        self.lengths = self.lengths + counts
        self._pending = None

    def last_hidden(self) -> Tensor:
        """(B, d) hidden state at each row's last committed position."""
        rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)
        return self.hidden[rows, self.lengths - 1]


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


@dataclass
class HeadsDecodeState:
    caches: list[KVCache] = field(default_factory=list)  # transformer: 1 (lockstep); sequential: 1 per depth
    chain: Tensor | None = None  # sequential: (n-2, B, S, d) chain states h_1..h_{n-2} per position
    pending: Tensor | None = None  # transformer: (B, W, n-1, d) head outputs of the last verify
    last: Tensor | None = None  # transformer: (B, n-1, d) head outputs at the last committed position


class MTPHeads(nn.Module):
    """Heads 1..n_future-1 of one ``head_type`` (see DESIGN.md's table)."""

    def __init__(self, cfg: MTPConfig):
        super().__init__()
        self.head_type, self.n_extra = cfg.head_type, cfg.n_future - 1
        self.share_embeddings = cfg.share_embeddings
        d, n = cfg.d_model, self.n_extra
        if n == 0:
            pass  # n_future == 1: a plain LM, no head parameters at all
        elif cfg.head_type == "residual":
            self.mlps = nn.ModuleList(ResidualMLP(d, cfg.head_activation) for _ in range(n))
        elif cfg.head_type == "modulated":
            self.step_embeddings = nn.Parameter(torch.zeros(n, d))
            self.transform = ResidualMLP(d, cfg.head_activation)
        elif cfg.head_type == "transformer":
            self.blocks = nn.ModuleList(Block(d, cfg.n_head, cfg.n_kv_head, cfg.d_ff, cfg.norm_eps) for _ in range(n))
            self.norms = nn.ModuleList(RMSNorm(d, cfg.norm_eps) for _ in range(n))
        elif cfg.head_type == "sequential":
            self.modules_ = nn.ModuleList(SequentialModule(cfg) for _ in range(n))
        # `linear` needs nothing but its own unembeddings.
        self.out = None if cfg.share_embeddings or n == 0 else nn.ModuleList(
            nn.Linear(d, cfg.vocab_size, bias=False) for _ in range(n))
        self.reset_parameters(cfg.init_std)

    @property
    def attends(self) -> bool:
        return self.head_type in ("transformer", "sequential")

    def reset_parameters(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for module in self.modules():
            if isinstance(module, ResidualMLP):
                nn.init.zeros_(module.down.weight)
        if self.head_type == "modulated" and self.n_extra:
            nn.init.normal_(self.step_embeddings, std=std)

    def unembed(self, i: int, g: Tensor, lm_head: nn.Module) -> Tensor:
        """Logits (..., V) of head i >= 1 from its hidden g (..., d)."""
        return lm_head(g) if self.out is None else self.out[i - 1](g)

    def head_hidden(self, i: int, hn: Tensor) -> Tensor:
        """g_i from the trunk's final-norm hidden, for the position-wise head types."""
        if self.head_type == "linear":
            return hn
        if self.head_type == "residual":
            return self.mlps[i - 1](hn)
        if self.head_type == "modulated":
            return self.transform(hn + self.step_embeddings[i - 1])
        raise AssertionError(f"{self.head_type} heads are not position-wise")

    # ----------------------------------------------------------------- training
    def hiddens(self, hn: Tensor, z: Tensor | None, tokens: Tensor, embed: nn.Module,
                rope: RotaryEmbedding) -> list[Tensor]:
        """Teacher-forced g_1..g_{n-1}, each (B, T, d).

        hn: (B, T, d) trunk final-norm hidden (lm_head input); z: (B, T, d) input of the
        trunk's last block (``transformer`` heads branch off there); tokens: (B, T).
        """
        if self.n_extra == 0:
            return []
        if self.head_type in ("linear", "residual", "modulated"):
            return [self.head_hidden(i, hn) for i in range(1, self.n_extra + 1)]
        ctx = causal_context(tokens.shape[0], tokens.shape[1], rope, tokens.device)
        if self.head_type == "transformer":
            return [norm(block(z, ctx)) for block, norm in zip(self.blocks, self.norms)]
        out, h = [], hn
        for k, module in enumerate(self.modules_, start=1):
            # Depth k at position t reads token t+k; past the end any id works (targets ignored).
            h = module(embed(shift_tokens(tokens, k, 0)), h, ctx)
            out.append(module.out_norm(h))
        return out

    # ----------------------------------------------------------------- decoding
    def new_decode_state(self, batch_size: int, capacity: int, cfg: MTPConfig, dtype, device) -> HeadsDecodeState:
        state = HeadsDecodeState()
        if self.head_type == "transformer" and self.n_extra:
            state.caches = [KVCache(self.n_extra, batch_size, cfg.n_kv_head, cfg.head_dim, capacity, dtype, device)]
        elif self.head_type == "sequential" and self.n_extra:
            state.caches = [KVCache(1, batch_size, cfg.n_kv_head, cfg.head_dim, capacity, dtype, device)
                            for _ in range(self.n_extra)]
            state.chain = torch.zeros(max(self.n_extra - 1, 0), batch_size, capacity, cfg.d_model,
                                      dtype=dtype, device=device)
        return state

    def on_verify(self, state: HeadsDecodeState, z: Tensor | None, ctx: PassContext) -> None:
        """Run attention heads that read every position (``transformer``) over the block."""
        if self.head_type != "transformer" or not self.n_extra:
            return
        cache = state.caches[0]
        state.pending = torch.stack([norm(block(z, ctx, cache, i))
                                     for i, (block, norm) in enumerate(zip(self.blocks, self.norms))], dim=2)

    def on_accept(self, state: HeadsDecodeState, keep: Tensor | None, counts: Tensor) -> None:
        if self.head_type != "transformer" or not self.n_extra:
            return
        state.caches[0].commit(keep, counts)
        rows = torch.arange(counts.shape[0], device=counts.device)
        last = counts - 1 if keep is None else keep[rows, counts - 1]
        state.last = state.pending[rows, last]  # (B, n-1, d)
        state.pending = None

    def crop(self, state: HeadsDecodeState, lengths: Tensor) -> None:
        """Shorten head caches after the trunk was cropped to ``lengths`` (B,)."""
        if self.head_type == "transformer" and self.n_extra:
            state.caches[0].crop(lengths)
            state.last = None  # only valid right after an accept
        elif self.head_type == "sequential":
            # Depth j's entry at s read token s+j: keep it only if that token is still committed.
            for j, cache in enumerate(state.caches, start=1):
                cache.crop(torch.minimum(cache.lengths, (lengths - j).clamp(min=0)))

    def draft(self, state: HeadsDecodeState, seq: CommittedSequence, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker, lm_head: nn.Module, embed: nn.Module, rope: RotaryEmbedding) -> tuple[Tensor, Tensor]:
        """Drafts (B, k) and raw logits (B, k, V) of heads 1..k at each row's last committed position."""
        if self.head_type == "sequential":
            logits = self._draft_chain(state, seq, next_tokens, num_draft, pick, lm_head, embed, rope)
            return torch.stack(logits[1], dim=1), torch.stack(logits[0], dim=1)
        tokens, all_logits = [], []
        hn_last = seq.last_hidden() if self.head_type != "transformer" else None
        for i in range(1, num_draft + 1):
            g = state.last[:, i - 1] if self.head_type == "transformer" else self.head_hidden(i, hn_last)
            logits = self.unembed(i, g, lm_head).float()  # (B, V)
            all_logits.append(logits)
            tokens.append(pick(logits, i - 1))
        return torch.stack(tokens, dim=1), torch.stack(all_logits, dim=1)

    def _draft_chain(self, state, seq, next_tokens, num_draft, pick, lm_head, embed, rope):
        """Run depths 1..k as a chain. Depth j's cache lags the trunk by j positions: its entry
        at position s reads token s+j, final once s+j <= L (L = committed length; token L is
        next_tokens). Each call first catches up the positions that became final, then
        computes position L-1 on drafted tokens; only final entries stay committed.
        """
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
            logits = self.unembed(j, module.out_norm(last), lm_head).float()
            token = pick(logits, j - 1)
            ext[rows, length + j] = token
            drafts.append(token)
            logits_out.append(logits)
            cache.lengths = torch.maximum(start, (length - j + 1).clamp(min=0))  # keep final entries
        return logits_out, drafts
