"""MTP heads on a frozen Hugging Face causal LM, behind the same decode protocol as MTPModel.

``MTPHeadsForCausalLM(base, n_future, head_type)`` puts heads 1..n-1 (``residual``,
``linear`` or ``sequential``) on the base's final-norm hidden state (the ``lm_head`` input)
and shares the base's ``lm_head`` and input embedding. Decoding runs Llama-family bases
through :mod:`multitoken.hf.lean_forward` (the base's own modules over a static KV cache with
per-row lengths, so a batch of prompts of different lengths decodes together) and any other
causal LM through its HF forward and one ``DynamicCache`` per row (:mod:`multitoken.hf.hf_forward`,
one row at a time); either cache is rolled back or compacted per row after each verify, so
`multitoken.generate` runs plain, self-speculative and tree decoding on it unchanged.
``from_pretrained`` / ``generate`` in HF's style: :mod:`multitoken.hf.generation`; heads files:
:mod:`multitoken.hf.heads_files`.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from multitoken.decoding import attach_tree_hints
from multitoken.errors import MultitokenError, first_line
from multitoken.hf.adapt import BaseAdaptationError, adapt_base, cache_layer, run_top_layers, trainable_base_state
from multitoken.hf.generation import HFGenerationMixin
from multitoken.hf.heads_files import (
    BASE_PREFIX, HEADS_CONFIG, HEADS_WEIGHTS, check_heads_fit, read_heads_config, read_heads_weights,
    split_base_weights,
)
from multitoken.hf.hf_forward import DynamicCacheRows, cache_keyword, hf_forward_rows
from multitoken.hf.hidden_cache import hidden_at_layer
from multitoken.hf.kernel_choice import cached_min_rows
from multitoken.hf.kernels import ONEDNN_NEVER, block_kernels, install_block_linears
from multitoken.hf.lean_forward import LeanDecoderForward, lean_forward_unsupported
from multitoken.hf.loading import HFTokenizer
from multitoken.hf.vocab_screen import VocabScreen, fast_bf16_available
from multitoken.io import atomic_write, write_json
from multitoken.model.config import MTPConfig
from multitoken.model.heads import HeadsDecodeState, SharedModules, build_heads
from multitoken.model.layers import CommittedSequence, KVCache, RotaryEmbedding
from multitoken.model.protocol import ConfigDecoderAttributes, DraftPicker, check_row_index, greedy_verify_active

HF_HEAD_TYPES = ("residual", "linear", "sequential")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)) or 10000.0)


def heads_config_for(base_config, n_future: int, head_type: str, d_ff: int | None = None) -> MTPConfig:
    """An MTPConfig whose widths mirror the base's, for building heads that fit it."""
    if head_type not in HF_HEAD_TYPES:
        raise MultitokenError(f"invalid head_type={head_type!r} for a Hugging Face base; allowed: {', '.join(HF_HEAD_TYPES)}")
    c = base_config
    n_head = c.num_attention_heads
    return MTPConfig(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layer=1, n_head=n_head,
                     n_kv_head=getattr(c, "num_key_value_heads", None) or n_head,
                     d_ff=d_ff or getattr(c, "intermediate_size", None) or 4 * c.hidden_size,
                     max_seq_len=c.max_position_embeddings,
                     rope_theta=_rope_theta(c), norm_eps=getattr(c, "rms_norm_eps", 1e-5),
                     n_future=n_future, head_type=head_type, share_embeddings=head_type != "linear")


@dataclass
class HFDecodeState:
    cache: KVCache | DynamicCacheRows  # the lean forward's static cache, or one HF DynamicCache per row
    heads: HeadsDecodeState  # committed tokens and final-norm hidden states, plus head caches
    capacity: int

    @property
    def lengths(self) -> Tensor:
        return self.heads.seq.lengths


class DraftVocabHead(nn.Module):
    """The shared ``lm_head`` restricted to a draft vocabulary, scattered back to the full one.

    Drafting computes logits over N draft ids only (a (N, d) slice of the (V, d) weight, copied
    contiguously once); the result is a full (..., V) tensor with -inf outside the draft ids, so
    the decode protocol, verification and acceptance stay exact and unchanged.
    """

    def __init__(self, weight: Tensor, ids: Tensor):
        super().__init__()
        self.vocab_size = weight.shape[0]
        self.register_buffer("ids", ids.to(device=weight.device, dtype=torch.long), persistent=False)
        self.register_buffer("weight_t", weight.detach()[self.ids].T.contiguous(), persistent=False)  # (d, N)

    def draft_logits(self, g: Tensor) -> Tensor:
        """(..., d) -> (..., N) logits over the draft ids."""
        return g @ self.weight_t

    def forward(self, g: Tensor) -> Tensor:
        small = self.draft_logits(g)  # (..., N)
        full = torch.full((*small.shape[:-1], self.vocab_size), float("-inf"), dtype=small.dtype, device=small.device)
        return full.index_copy_(-1, self.ids, small)


class MTPHeadsForCausalLM(HFGenerationMixin, ConfigDecoderAttributes, nn.Module):
    """An HF causal LM (frozen, or with trained top layers) + MTP heads. Head 0 is the base's own head."""

    def __init__(self, base: nn.Module, n_future: int = 4, head_type: str = "residual", d_ff: int | None = None,
                 freeze_base: bool = True, identity: dict | None = None, fast_kernels: bool = True,
                 train_base_layers: int = 0, lora_rank: int = 0, fast_forward: bool = True,
                 vocab_screen: bool | None = None):
        """fast_kernels: decode passes of a float32 CPU base multiply blocks of rows through
        oneDNN-reordered weights (:mod:`multitoken.hf.kernels`; the base's ``nn.Linear`` layers
        become ``BlockLinear``, which is ``F.linear`` everywhere else), from the block size at
        which that is faster on this CPU (``kernel_min_rows``, measured once per machine). A block
        of 4 tokens then costs ~1.2-1.4x one token instead of ~1.6-1.8x on a 2-core CPU, at the
        price of a second copy of the weights.
        fast_forward: decode Llama-family bases with :class:`LeanDecoderForward` (same modules,
        same operations, a static KV cache, none of HF's per-call machinery); other bases, or
        False, use the HF forward and ``DynamicCache``.
        train_base_layers / lora_rank: also train the base's top N layers, in full or through
        LoRA adapters (:mod:`multitoken.hf.adapt`); decoding then reproduces the adapted base.
        vocab_screen: greedy passes of a float32 base find the base head's argmax through a
        bfloat16 screen and float32 logits where the maximum can be (:mod:`multitoken.hf.vocab_screen`;
        the same argmax for about half the bytes). None: where the CPU multiplies bfloat16
        natively and the base head is a plain linear; True: also elsewhere (slower, for tests)."""
        super().__init__()
        self.base = base
        self.adaptation = {"layers": int(train_base_layers), "lora_rank": int(lora_rank)}
        self.cfg = heads_config_for(base.config, n_future, head_type, d_ff)
        self.rope = RotaryEmbedding(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.heads = build_heads(self.cfg, SharedModules(self.lm_head, self.embed, self.rope))
        self.identity = identity or {}
        if train_base_layers:
            adapt_base(self.base, train_base_layers, lora_rank)
        elif lora_rank:
            raise BaseAdaptationError("lora_rank needs train_base_layers (the layers that get adapters)")
        elif freeze_base:
            for p in self.base.parameters():
                p.requires_grad_(False)
        self.heads.to(device=self._device(), dtype=self._dtype())
        self.cache_kw = cache_keyword(self.base)  # what the HF forward takes its cache as
        self.draft_head: DraftVocabHead | None = None  # set_draft_vocab: drafts over N ids only
        self.fast_kernels = fast_kernels and self._device().type == "cpu" and self._dtype() == torch.float32 \
            and install_block_linears(self) > 0  # the base's linears and the heads'
        # Blocks of at least this many rows go through oneDNN; None: measured on first decode
        # (multitoken.hf.kernel_choice, cached per machine). Set an int to skip the measurement.
        self.kernel_min_rows: int | None = None
        self.lean_forward = LeanDecoderForward(self.base) \
            if fast_forward and lean_forward_unsupported(self.base) is None else None
        self.vocab_screen = self._vocab_screen(vocab_screen)

    def _vocab_screen(self, wanted: bool | None) -> VocabScreen | None:
        head = self.lm_head
        plain = isinstance(head, nn.Linear) and head.bias is None and head.weight.dtype == torch.float32 \
            and head.weight.device.type == "cpu" and getattr(self.base.config, "final_logit_softcapping", None) is None
        if wanted is False or not plain or (wanted is None and not fast_bf16_available()):
            return None
        return VocabScreen(head.weight)

    def base_logits(self, hidden: Tensor) -> Tensor:
        """The base head's float32 logits (..., V) of final-norm states (..., d); inside
        :func:`~multitoken.model.protocol.greedy_verify`, through the vocabulary screen when
        there is one (the same argmax)."""
        screen = self.vocab_screen
        # (a model moved to another device or dtype after construction keeps the plain head)
        if screen is not None and greedy_verify_active() and hidden.device.type == "cpu" \
                and hidden.dtype == screen.weight.dtype == torch.float32:
            return screen.logits(hidden)
        return self.lm_head(hidden).float()

    # ----------------------------------------------------------------- draft vocabulary
    @property
    def draft_ids(self) -> Tensor | None:
        """(N,) long ids of the draft vocabulary, or None (drafts over the full vocabulary)."""
        return None if self.draft_head is None else self.draft_head.ids

    def set_draft_vocab(self, ids) -> None:
        """Draft only over ``ids`` (sorted unique token ids; None = the full vocabulary).

        Needs heads that share the base's ``lm_head`` (residual, sequential). Verification
        still scores the full vocabulary, so greedy output is unchanged; only drafts outside
        the draft vocabulary become impossible.
        """
        if ids is not None:
            if self.heads.out is not None:
                raise MultitokenError("a draft vocabulary needs heads that share the base's lm_head "
                                      "(residual, sequential)")
            ids = torch.as_tensor(ids, dtype=torch.long).unique()  # sorted
            if len(ids) == 0 or int(ids.min()) < 0 or int(ids.max()) >= self.cfg.vocab_size:
                raise MultitokenError(f"draft vocabulary ids must be in [0, {self.cfg.vocab_size}) and not empty")
        # Registered here (moves with the wrapper); the heads draft through it.
        self.draft_head = None if ids is None else DraftVocabHead(self.lm_head.weight, ids)
        self.heads.shared.draft_lm_head = self.draft_head

    def _device(self):
        return self.base.get_output_embeddings().weight.device

    def _dtype(self):
        return self.base.get_output_embeddings().weight.dtype

    @property
    def lm_head(self) -> nn.Module:
        return self.base.get_output_embeddings()

    @property
    def embed(self) -> nn.Module:
        return self.base.get_input_embeddings()

    # ----------------------------------------------------------------- training
    def head_logits(self, i: int, g: Tensor) -> Tensor:
        return self.lm_head(g) if i == 0 else self.heads.unembed(i, g)

    @property
    def trains_base(self) -> bool:
        """True when the base's top layers train along with the heads (``train_base_layers``)."""
        return self.adaptation["layers"] > 0

    @property
    def cache_layer(self) -> int | None:
        """Which base hidden state training starts from: None = the final post-norm one (frozen
        base), i = the input of decoder layer i (the first trained one)."""
        return cache_layer(self.base, self.adaptation["layers"])

    def head_hiddens_from(self, hidden: Tensor, tokens: Tensor, positions: Tensor | None = None) -> list[Tensor]:
        """g_0..g_{n-1} (B, T, d) from cached base hidden states (B, T, d) at :attr:`cache_layer`
        and tokens (B, T); trained base layers run here. positions (B, T): rows of packed
        documents (a hidden cache's), each attended to on its own."""
        if self.trains_base:
            hidden = run_top_layers(self.base, hidden, self.adaptation["layers"], positions)
        return [hidden] + self.heads.hiddens(hidden, None, tokens, positions)

    @torch.no_grad()
    def base_hidden(self, tokens: Tensor) -> Tensor:
        """(B, T, d) hidden states of the base at :attr:`cache_layer` (what a hidden cache holds)."""
        return hidden_at_layer(self.base, tokens, self.cache_layer)[0]

    def head_hiddens(self, tokens: Tensor) -> list[Tensor]:
        return self.head_hiddens_from(self.base_hidden(tokens), tokens)

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> logits (B, T, n_future, V) (base frozen, heads teacher-forced)."""
        return torch.stack([self.head_logits(i, g) for i, g in enumerate(self.head_hiddens(tokens))], dim=2)

    # ----------------------------------------------------------------- decoding protocol
    def new_state(self, batch_size: int, capacity: int) -> HFDecodeState:
        device, dtype = self._device(), self._dtype()
        if self.lean_forward is not None:
            cache = self.lean_forward.new_cache(batch_size, capacity, dtype, device)
        else:
            if batch_size > 1:  # Python shows a warning once per place: once, not per row or call
                why = lean_forward_unsupported(self.base) or "fast_forward=False"
                warnings.warn(f"this base decodes a batch one row at a time (HF forward, no lean forward: {why})",
                              stacklevel=2)
            cache = DynamicCacheRows(self.base.config, batch_size)
        seq = CommittedSequence(batch_size, capacity, self.cfg.d_model, dtype, device)
        return HFDecodeState(cache, self.heads.new_decode_state(seq), capacity)

    def select_rows(self, state: HFDecodeState, index: Tensor) -> HFDecodeState:
        """A state holding only rows ``index`` (B',) long, in that order (the decode loop drops
        finished rows with it)."""
        check_row_index(index, state.lengths.shape[0])
        index = index.to(state.lengths.device)
        return HFDecodeState(state.cache.select(index), state.heads.select(index), state.capacity)

    @torch.no_grad()
    def verify(self, state: HFDecodeState, tokens: Tensor, tree_mask: Tensor | None = None,
               depths: Tensor | None = None) -> Tensor:
        with block_kernels(self.fast_kernels, self.block_min_rows):
            hidden = self._verify_hidden(state, tokens, tree_mask, depths)
            return self.base_logits(hidden)

    @torch.no_grad()
    def verify_last(self, state: HFDecodeState, tokens: Tensor, last: Tensor) -> Tensor:
        """``verify`` of a causal block (a prefill) that scores only position ``last[b]`` of each
        row: (B, V) logits, without the base head's (B, W, V) over the whole prompt."""
        with block_kernels(self.fast_kernels, self.block_min_rows):
            hidden = self._verify_hidden(state, tokens, None, None)  # (B, W, d)
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.base_logits(hidden[rows, last.to(hidden.device)])

    def _verify_hidden(self, state: HFDecodeState, tokens: Tensor, tree_mask: Tensor | None,
                       depths: Tensor | None) -> Tensor:
        """The final-norm hidden states (B, W, d) of a verify pass; the heads see them too."""
        if self.lean_forward is not None:
            hidden = self.lean_forward(tokens, state.cache, depths, tree_mask)
        else:
            hidden = hf_forward_rows(self.base, self.cache_kw, state.cache, tokens, tree_mask, depths)
        self.heads.on_verify(state.heads, tokens, hidden)
        return hidden

    @torch.no_grad()
    def accept(self, state: HFDecodeState, keep: Tensor | None, counts: Tensor) -> None:
        state.cache.commit(keep, counts)
        self.heads.on_accept(state.heads, keep, counts)

    @torch.no_grad()
    def crop(self, state: HFDecodeState, lengths: Tensor) -> None:
        state.cache.crop(lengths)
        self.heads.crop(state.heads, lengths)

    @torch.no_grad()
    def draft(self, state: HFDecodeState, next_tokens: Tensor, num_draft: int,
              pick: DraftPicker) -> tuple[Tensor, Tensor]:
        self.check_num_draft(num_draft)
        with block_kernels(self.fast_kernels, self.block_min_rows):
            return self.heads.draft(state.heads, next_tokens, num_draft, pick)

    # ----------------------------------------------------------------- heads on disk
    def save_heads(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """heads.safetensors + heads_config.json (base identity and vocabulary recorded), each atomically."""
        from safetensors.torch import save
        out = Path(out_dir)
        state = {k: v.detach().contiguous() for k, v in self.heads.state_dict().items()}
        if self.trains_base:
            state.update({BASE_PREFIX + k: v.contiguous() for k, v in trainable_base_state(self.base).items()})
        atomic_write(out / HEADS_WEIGHTS, save(state))
        meta = {"heads": self.cfg.to_dict(), "base": self.identity, "base_adaptation": self.adaptation,
                **(extra or {})}
        if self.draft_ids is not None:
            meta["draft_vocab"] = self.draft_ids.tolist()
        write_json(out / HEADS_CONFIG, meta)
        return out

    @classmethod
    def from_heads(cls, base: nn.Module, heads_dir: str | Path, identity: dict | None = None,
                   fast_kernels: bool = True, fast_forward: bool = True) -> "MTPHeadsForCausalLM":
        """Attach saved heads to ``base``; refuse heads trained for another base or vocabulary."""
        heads_dir = Path(heads_dir)
        meta, cfg = read_heads_config(heads_dir)
        check_heads_fit(base.config, heads_dir, meta, cfg, identity)
        adaptation = meta.get("base_adaptation") or {}
        model = cls(base, cfg.n_future, cfg.head_type, d_ff=cfg.d_ff, identity=identity or meta.get("base") or {},
                    fast_kernels=fast_kernels, fast_forward=fast_forward,
                    train_base_layers=int(adaptation.get("layers", 0)),
                    lora_rank=int(adaptation.get("lora_rank", 0)))
        head_state, trained = split_base_weights(read_heads_weights(heads_dir))
        expected = set(trainable_base_state(model.base))
        if set(trained) != expected:
            raise MultitokenError(f"{heads_dir / HEADS_WEIGHTS} holds trained base weights {sorted(trained)[:3]}... "
                                  f"but the recorded adaptation {adaptation} expects {sorted(expected)[:3]}...")
        if trained:
            model.base.load_state_dict(trained, strict=False)
        missing, unexpected = (sorted(set(model.heads.state_dict()) - set(head_state)),
                               sorted(set(head_state) - set(model.heads.state_dict())))
        if missing or unexpected:  # e.g. heads of another format or head type under this config
            raise MultitokenError(f"{heads_dir / HEADS_WEIGHTS} does not hold the weights its {HEADS_CONFIG} "
                                  f"describes (missing {missing[:2]}, unexpected {unexpected[:2]}): not heads of "
                                  "this format; retrain them with `multitoken heads train`")
        try:
            model.heads.load_state_dict(head_state)
        except RuntimeError as e:  # right names, wrong shapes
            raise MultitokenError(f"{heads_dir / HEADS_WEIGHTS} does not fit its {HEADS_CONFIG}: {first_line(e)}") from None
        if meta.get("draft_vocab") is not None:
            try:
                model.set_draft_vocab(meta["draft_vocab"])
            except (ValueError, TypeError, RuntimeError) as e:
                raise MultitokenError(f"corrupt draft_vocab in {heads_dir / HEADS_CONFIG}: {first_line(e)}") from None
        model.heads_dir = heads_dir
        attach_tree_hints(model, heads_dir)
        return model

    @property
    def block_min_rows(self) -> int:
        """Blocks of this many rows or more use oneDNN (``kernel_min_rows``, measured and cached
        on first use when None; ONEDNN_NEVER without fast kernels)."""
        if not self.fast_kernels:
            return ONEDNN_NEVER
        if self.kernel_min_rows is None:
            self.kernel_min_rows = cached_min_rows(self)
        return self.kernel_min_rows

    @property
    def cost_key(self) -> dict:
        """Settings that change the cost of a pass (a calibration made under others is not reused)."""
        return {"fast_kernels": bool(self.fast_kernels), "kernel_min_rows": self.block_min_rows,
                "lean_forward": self.lean_forward is not None, "vocab_screen": self.vocab_screen is not None,
                "draft_vocab": None if self.draft_ids is None else int(self.draft_ids.numel())}


def load_heads_model(base: str, heads: str | None, dtype: torch.dtype | str = torch.float32,
                     fast_kernels: bool = True, fast_forward: bool = True):
    """(MTPHeadsForCausalLM with the saved heads, HFTokenizer) for `generate --base ... [--heads ...]`:
    ``heads`` is a folder, a shipped name, or None for the heads shipped for ``base``
    (:meth:`MTPHeadsForCausalLM.from_pretrained`)."""
    model = MTPHeadsForCausalLM.from_pretrained(base, heads, dtype=dtype, fast_kernels=fast_kernels,
                                                fast_forward=fast_forward)
    return model, HFTokenizer(model.tokenizer)
