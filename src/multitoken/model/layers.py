"""Transformer building blocks shared by the trunk and the attention-based heads.

RMSNorm, rotary position embedding (Llama's rotate-half layout, so Llama checkpoints
load unchanged), grouped-query attention through ``scaled_dot_product_attention``,
SwiGLU MLP, a pre-norm block, a static KV cache with per-row lengths, and the committed
tokens and hidden states the heads read while decoding.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multitoken.errors import MultitokenError


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 (as Llama does) so bf16 activations keep their precision.
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.weight


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len); looked up by explicit positions."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (S, Dh/2)
        angles = torch.cat([angles, angles], dim=-1)  # (S, Dh), rotate-half layout
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions (B, T) long -> cos, sin (B, 1, T, Dh), broadcast over heads."""
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            raise MultitokenError(f"position {int(positions.max())} exceeds max_seq_len={self.cos.shape[0]}")
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


@dataclass
class PassContext:
    """Everything one forward pass shares across layers: positions, cache slots, mask.

    Built once per pass so every layer (trunk and attention heads) uses the same geometry.
    """

    cos: Tensor  # (B, 1, W, Dh)
    sin: Tensor  # (B, 1, W, Dh)
    slots: Tensor | None = None  # (B, W) cache slot each new token is written to; None = no cache
    mask: Tensor | None = None  # (B, 1, W, S) bool, True = may attend; None = plain causal
    kv_len: int = 0  # S: cache slots read by this pass
    _signed_sin: Tensor | None = field(default=None, init=False, repr=False)

    def rotate(self, x: Tensor) -> Tensor:
        """x (B, H, W, Dh) rotated by this pass's angles, Llama's rotate-half layout:
        x * cos + cat(-x2, x1) * sin, computed as x * cos + roll(x) * cat(-sin1, sin2) (the same
        products, so the same floats, with fewer operations per call)."""
        if self._signed_sin is None:
            half = self.sin.shape[-1] // 2
            self._signed_sin = torch.cat([-self.sin[..., :half], self.sin[..., half:]], dim=-1)
        return (x * self.cos + x.roll(x.shape[-1] // 2, -1) * self._signed_sin).to(x.dtype)


def block_attention_mask(lengths: Tensor, width: int, kv_len: int, tree_mask: Tensor | None) -> Tensor:
    """(B, 1, W, S) bool: new token i of row b sees the row's committed prefix and the block
    tokens j with tree_mask[i, j] (its ancestors and itself; lower-triangular for a chain).

    lengths: (B,) committed tokens per row; block token j lives in slot lengths[b] + j.
    """
    device = lengths.device
    if tree_mask is None:
        tree_mask = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    batch = lengths.shape[0]
    tree_mask = tree_mask.to(device).expand(batch, width, width)
    rel = torch.arange(kv_len, device=device)[None, :] - lengths[:, None]  # (B, S) slot - row start
    prefix = rel < 0
    in_block = (rel >= 0) & (rel < width)
    idx = rel.clamp(0, width - 1)[:, None, :].expand(batch, width, kv_len)  # (B, W, S)
    block_visible = tree_mask.gather(2, idx) & in_block[:, None, :]
    return (prefix[:, None, :] | block_visible).unsqueeze(1)


class KVCache:
    """Static key/value buffers for ``n_layers`` attention layers, with per-row lengths.

    Row b holds ``lengths[b]`` committed entries in slots [0, lengths[b]); a forward pass
    writes its W new tokens to slots lengths[b] .. lengths[b]+W-1 (pending). ``commit``
    keeps a subset of the pending entries (moving them to contiguous slots) and ``crop``
    shortens rows; slots past a row's length are garbage that masks never expose.
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_head: int, head_dim: int,
                 capacity: int, dtype: torch.dtype, device: torch.device | str):
        shape = (n_layers, batch_size, n_kv_head, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.capacity = capacity

    def slots_read(self, width: int) -> int:
        """S, the cache slots a pass appending ``width`` tokens reads; refuses one that does not fit."""
        kv_len = int(self.lengths.max()) + width
        if kv_len > self.capacity:
            raise MultitokenError(f"KV cache full: need {kv_len} slots, capacity is {self.capacity}")
        return kv_len

    def context_for(self, width: int, rope: RotaryEmbedding, tree_mask: Tensor | None = None,
                    depths: Tensor | None = None) -> PassContext:
        """Geometry of a pass that appends ``width`` tokens after each row's committed prefix."""
        device = self.lengths.device
        kv_len = self.slots_read(width)
        offsets = torch.arange(width, device=device)
        if depths is None:
            depths = offsets
        positions = self.lengths[:, None] + depths.to(device)  # (B, W)
        cos, sin = rope(positions)
        mask = block_attention_mask(self.lengths, width, kv_len, tree_mask)
        return PassContext(cos, sin, self.lengths[:, None] + offsets, mask, kv_len)

    def write(self, layer: int, k_new: Tensor, v_new: Tensor, ctx: PassContext) -> tuple[Tensor, Tensor]:
        """Store k_new, v_new (B, Hkv, W, Dh) in their slots; return keys/values (B, Hkv, S, Dh)."""
        rows = torch.arange(k_new.shape[0], device=k_new.device)[:, None]  # (B, 1)
        # Advanced indices (rows, slots) around a slice put (B, W) first: (B, W, Hkv, Dh).
        self.k[layer][rows, :, ctx.slots] = k_new.transpose(1, 2).to(self.k.dtype)
        self.v[layer][rows, :, ctx.slots] = v_new.transpose(1, 2).to(self.v.dtype)
        return self.k[layer, :, :, : ctx.kv_len], self.v[layer, :, :, : ctx.kv_len]

    def commit(self, keep: Tensor | None, counts: Tensor) -> None:
        """Keep pending entries keep[b, :counts[b]] (ascending block offsets) of the last pass.

        Columns of ``keep`` past counts[b] must still be valid offsets (pad with 0): they are
        moved too, into slots past the row's new length, which no mask exposes.

        keep=None means a prefix (offsets 0..counts[b]-1): nothing moves. Otherwise the kept
        entries move to slots lengths[b] + 0, 1, ...; since offsets ascend, every destination
        is at or before its source, so one gather-then-scatter is safe.
        """
        counts = counts.to(self.lengths)
        if keep is not None:
            batch, m = keep.shape
            rows = torch.arange(batch, device=keep.device)[:, None]
            src = self.lengths[:, None] + keep
            dst = self.lengths[:, None] + torch.arange(m, device=keep.device)[None, :]
            for buf in (self.k, self.v):
                moved = buf[:, rows, :, src]  # (B, M, L, Hkv, Dh): advanced indices first
                buf[:, rows, :, dst] = moved
        self.lengths = self.lengths + counts

    def crop(self, lengths: Tensor | int) -> None:
        """Shorten rows to ``lengths`` (int or (B,)) committed entries."""
        new = torch.as_tensor(lengths, device=self.lengths.device).expand_as(self.lengths)
        if bool((new > self.lengths).any()) or bool((new < 0).any()):
            raise ValueError("crop can only shorten the cache")
        self.lengths = new.clone()

    def select(self, index: Tensor) -> "KVCache":
        """A cache holding only rows ``index`` (B',) long, in that order (a copy; self is unchanged)."""
        out = copy.copy(self)
        out.k, out.v, out.lengths = self.k[:, index], self.v[:, index], self.lengths[index]
        return out


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

    def select(self, index: Tensor) -> "CommittedSequence":
        """The rows ``index`` (B',) long, in that order, pending block included (a copy)."""
        out = copy.copy(self)
        out.tokens, out.hidden, out.lengths = self.tokens[index], self.hidden[index], self.lengths[index]
        if self._pending is not None:
            out._pending = (self._pending[0][index], self._pending[1][index])
        return out

    def last_hidden(self) -> Tensor:
        """(B, d) hidden state at each row's last committed position."""
        rows = torch.arange(self.lengths.shape[0], device=self.lengths.device)
        return self.hidden[rows, self.lengths - 1]


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention of a few new queries over a cache: q (B, H, W, Dh), k/v (B, Hkv, S, Dh),
    mask (B, 1, W, S) bool -> (B, H, W, Dh).

    Written out rather than through SDPA: for short query blocks over a strided cache view,
    CPU SDPA kernels were several times slower here. Query heads sharing a key/value head
    are folded into the query axis, so GQA needs no repeated keys.
    """
    batch, n_head, width, head_dim = q.shape
    group = n_head // k.shape[1]
    qg = q.reshape(batch, k.shape[1], group * width, head_dim)  # head h reads kv head h // group
    scores = (qg @ k.transpose(-1, -2)).float() * head_dim ** -0.5  # (B, Hkv, group*W, S)
    scores = scores.masked_fill(~mask.repeat(1, 1, group, 1), float("-inf"))
    out = scores.softmax(-1).to(v.dtype) @ v  # (B, Hkv, group*W, Dh)
    return out.reshape(batch, n_head, width, head_dim)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, n_kv_head: int):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = d_model // n_head
        self.q_proj = nn.Linear(d_model, n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * self.head_dim, d_model, bias=False)

    def forward(self, x: Tensor, ctx: PassContext, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        batch, width, _ = x.shape  # (B, W, d)
        q = self.q_proj(x).view(batch, width, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, width, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, width, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = ctx.rotate(q), ctx.rotate(k)
        if cache is not None:
            k, v = cache.write(layer, k, v, ctx)  # (B, Hkv, S, Dh)
        if ctx.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        else:
            out = masked_attention(q, k.to(q.dtype), v.to(q.dtype), ctx.mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, width, -1))  # (B, W, d)


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, d_ff: int, eps: float):
        super().__init__()
        self.input_norm = RMSNorm(d_model, eps)
        self.attn = Attention(d_model, n_head, n_kv_head)
        self.post_attn_norm = RMSNorm(d_model, eps)
        self.mlp = SwiGLU(d_model, d_ff)

    def forward(self, x: Tensor, ctx: PassContext, cache: KVCache | None = None, layer: int = 0) -> Tensor:
        x = x + self.attn(self.input_norm(x), ctx, cache, layer)
        return x + self.mlp(self.post_attn_norm(x))


def causal_context(batch: int, width: int, rope: RotaryEmbedding, device) -> PassContext:
    """Cache-free pass over positions 0..W-1 (training and teacher-forced scoring)."""
    positions = torch.arange(width, device=device).expand(batch, width)
    cos, sin = rope(positions)
    return PassContext(cos, sin)


def document_ids(positions: Tensor) -> Tensor:
    """(B, T) long: which document of its row each token belongs to, for rows of packed
    documents whose positions (B, T) restart at 0 where a document starts."""
    return (positions == 0).long().cumsum(-1)


def document_mask(positions: Tensor) -> Tensor:
    """(B, 1, T, T) bool, True = may attend: causal within each packed document, nothing across
    documents (positions (B, T) as in :func:`document_ids`)."""
    docs = document_ids(positions)
    width = positions.shape[-1]
    causal = torch.ones(width, width, dtype=torch.bool, device=positions.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal).unsqueeze(1)


def packed_context(positions: Tensor, rope: RotaryEmbedding) -> PassContext:
    """Cache-free pass over rows of packed documents: each token at its own document's position,
    attending to its own document only (what it sees when that document is decoded alone)."""
    cos, sin = rope(positions)
    return PassContext(cos, sin, mask=document_mask(positions))
