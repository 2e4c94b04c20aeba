"""MTP heads on a frozen Hugging Face causal LM, behind the same decode protocol as MTPModel.

``MTPHeadsForCausalLM(base, n_future, head_type)`` puts heads 1..n-1 (``residual``,
``linear`` or ``sequential``) on the base's final-norm hidden state (the ``lm_head`` input)
and shares the base's ``lm_head`` and input embedding. Decoding runs Llama-family bases
through :mod:`multitoken.hf.lean_forward` (the base's own modules over a static KV cache) and any
other causal LM through its HF forward and ``DynamicCache``; either cache is rolled back or
compacted after each verify, so `multitoken.generate` runs plain, self-speculative and tree
decoding on it unchanged (batch 1).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from multitoken.errors import MultitokenError, first_line
from multitoken.hf.adapt import BaseAdaptationError, adapt_base, cache_layer, run_top_layers, trainable_base_state
from multitoken.hf.hidden_cache import hidden_at_layer
from multitoken.hf.kernels import block_kernels, install_block_linears
from multitoken.hf.lean_forward import LeanDecoderForward, lean_forward_unsupported
from multitoken.hf.loading import HFTokenizer, load_base, model_identity, require_package
from multitoken.io import atomic_write, read_json, write_json
from multitoken.model.config import MTPConfig
from multitoken.model.heads import HeadsDecodeState, SharedModules, build_heads
from multitoken.model.layers import CommittedSequence, KVCache, RotaryEmbedding
from multitoken.model.protocol import ConfigDecoderAttributes, DraftPicker

HF_HEAD_TYPES = ("residual", "linear", "sequential")
HEADS_WEIGHTS, HEADS_CONFIG = "heads.safetensors", "heads_config.json"
BASE_PREFIX = "base."  # trained base weights (train_base_layers) in heads.safetensors


class HeadsMismatchError(MultitokenError):
    """Heads trained for another base model or vocabulary."""


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


class DynamicCacheAdapter:
    """A transformers ``DynamicCache`` (batch 1) behind :class:`KVCache`'s ``commit`` / ``crop``.

    HF's forward appends every block it sees; ``length`` counts the committed positions, and
    ``commit`` keeps a prefix (a slice) or a tree path (a gather) of the last block.
    """

    def __init__(self, config):
        require_package("transformers", "pip install transformers")
        from transformers import DynamicCache
        self.hf = DynamicCache(config=config)
        self.length = 0

    def drop_pending(self) -> None:
        """Forget a block that was verified but never committed (HF appended it anyway)."""
        if self.hf.get_seq_length() > self.length:
            self._keep(self.length)

    def commit(self, keep: Tensor | None, counts: Tensor) -> None:
        count = int(counts[0])
        if keep is None:
            self._keep(self.length + count)
        else:
            self._keep(self.length, keep[0, :count])
        self.length += count

    def crop(self, lengths: Tensor) -> None:
        self.length = int(lengths[0])
        self._keep(self.length)

    def _keep(self, length: int, path: Tensor | None = None) -> None:
        """Keep the first ``length`` positions (a slice) and, for a tree, then the block offsets
        ``path`` after them (a gather)."""
        if path is not None:
            index = torch.cat([torch.arange(length, device=path.device), length + path])
        for layer in self.hf.layers:
            if path is None:
                layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]
            else:
                layer.keys = layer.keys.index_select(2, index)
                layer.values = layer.values.index_select(2, index)


@dataclass
class HFDecodeState:
    cache: KVCache | DynamicCacheAdapter  # the lean forward's static cache, or HF's DynamicCache
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


class MTPHeadsForCausalLM(ConfigDecoderAttributes, nn.Module):
    """An HF causal LM (frozen, or with trained top layers) + MTP heads. Head 0 is the base's own head."""

    def __init__(self, base: nn.Module, n_future: int = 4, head_type: str = "residual", d_ff: int | None = None,
                 freeze_base: bool = True, identity: dict | None = None, fast_kernels: bool = True,
                 train_base_layers: int = 0, lora_rank: int = 0, fast_forward: bool = True):
        """fast_kernels: decode passes of a float32 CPU base multiply through oneDNN-reordered
        weights (:mod:`multitoken.hf.kernels`; the base's ``nn.Linear`` layers become ``BlockLinear``,
        which is ``F.linear`` everywhere else). A block of 4 tokens then costs ~1.2x one token
        instead of ~1.8x on a 2-core CPU, at the price of a second copy of the weights.
        fast_forward: decode Llama-family bases with :class:`LeanDecoderForward` (same modules,
        same operations, a static KV cache, none of HF's per-call machinery); other bases, or
        False, use the HF forward and ``DynamicCache``.
        train_base_layers / lora_rank: also train the base's top N layers, in full or through
        LoRA adapters (:mod:`multitoken.hf.adapt`); decoding then reproduces the adapted base."""
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
        params = inspect.signature(type(self.base.base_model).forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.draft_head: DraftVocabHead | None = None  # set_draft_vocab: drafts over N ids only
        self.fast_kernels = fast_kernels and self._device().type == "cpu" and self._dtype() == torch.float32 \
            and install_block_linears(self) > 0  # the base's linears and the heads'
        self.lean_forward = LeanDecoderForward(self.base) \
            if fast_forward and lean_forward_unsupported(self.base) is None else None

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

    def head_hiddens_from(self, hidden: Tensor, tokens: Tensor) -> list[Tensor]:
        """g_0..g_{n-1} (B, T, d) from cached base hidden states (B, T, d) at :attr:`cache_layer`
        and tokens (B, T); trained base layers run here."""
        if self.trains_base:
            hidden = run_top_layers(self.base, hidden, self.adaptation["layers"])
        return [hidden] + self.heads.hiddens(hidden, None, tokens)

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
        if batch_size != 1:
            raise MultitokenError("Hugging Face models decode one prompt at a time here (batch size 1)")
        device, dtype = self._device(), self._dtype()
        cache = self.lean_forward.new_cache(batch_size, capacity, dtype, device) \
            if self.lean_forward is not None else DynamicCacheAdapter(self.base.config)
        seq = CommittedSequence(1, capacity, self.cfg.d_model, dtype, device)
        return HFDecodeState(cache, self.heads.new_decode_state(seq), capacity)

    @torch.no_grad()
    def verify(self, state: HFDecodeState, tokens: Tensor, tree_mask: Tensor | None = None,
               depths: Tensor | None = None) -> Tensor:
        with block_kernels(self.fast_kernels):
            if self.lean_forward is not None:
                hidden = self.lean_forward(tokens, state.cache, depths, tree_mask)  # (1, W, d) final-norm
            else:
                hidden = self._hf_forward(state, tokens, tree_mask, depths)
            logits = self.lm_head(hidden).float()
        self.heads.on_verify(state.heads, tokens, hidden)
        return logits

    def _hf_forward(self, state: HFDecodeState, tokens: Tensor, tree_mask: Tensor | None,
                    depths: Tensor | None) -> Tensor:
        """The base's own forward over a ``DynamicCache`` -> final-norm hidden (1, W, d)."""
        length, width = int(state.lengths[0]), tokens.shape[1]
        if depths is None:
            depths = torch.arange(width, device=tokens.device)
        state.cache.drop_pending()  # keeps "nothing is committed until accept" (e.g. timing repeated verifies)
        positions = (length + depths.reshape(-1, width)[:1]).to(tokens.device)  # (1, W)
        kwargs = {self._cache_kw: state.cache.hf, "position_ids": positions, "use_cache": True}
        if tree_mask is not None:
            tm = tree_mask.reshape(-1, width, width)[:1].to(tokens.device)
            prefix = torch.ones(1, width, length, dtype=torch.bool, device=tokens.device)
            mask = torch.cat([prefix, tm], dim=2)[:, None]  # (1, 1, W, L + W) True = attend
            kwargs["attention_mask"] = torch.zeros(mask.shape, dtype=self._dtype(), device=tokens.device) \
                .masked_fill(~mask, torch.finfo(self._dtype()).min)
        return self.base.base_model(input_ids=tokens, **kwargs).last_hidden_state

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
        with block_kernels(self.fast_kernels):
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
        meta, cfg = _read_heads_config(heads_dir)
        if cfg.vocab_size != base.config.vocab_size or cfg.d_model != base.config.hidden_size:
            raise HeadsMismatchError(f"heads in {heads_dir} were trained for a base with vocab_size={cfg.vocab_size}, "
                                     f"d_model={cfg.d_model}; this base has vocab_size={base.config.vocab_size}, "
                                     f"d_model={base.config.hidden_size}")
        saved = meta.get("base") or {}
        if identity and saved.get("fingerprint") and identity.get("fingerprint") != saved["fingerprint"]:
            raise HeadsMismatchError(f"heads in {heads_dir} were trained for base {saved.get('name') or '?'} "
                                     f"(fingerprint {saved['fingerprint']}), not this one ({identity.get('fingerprint')})")
        adaptation = meta.get("base_adaptation") or {}
        model = cls(base, cfg.n_future, cfg.head_type, d_ff=cfg.d_ff, identity=identity or saved,
                    fast_kernels=fast_kernels, fast_forward=fast_forward,
                    train_base_layers=int(adaptation.get("layers", 0)),
                    lora_rank=int(adaptation.get("lora_rank", 0)))
        state = _read_heads_weights(heads_dir)
        trained = {k[len(BASE_PREFIX):]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
        expected = set(trainable_base_state(model.base))
        if set(trained) != expected:
            raise MultitokenError(f"{heads_dir / HEADS_WEIGHTS} holds trained base weights {sorted(trained)[:3]}... "
                                  f"but the recorded adaptation {adaptation} expects {sorted(expected)[:3]}...")
        if trained:
            model.base.load_state_dict(trained, strict=False)
        model.heads.load_state_dict({k: v for k, v in state.items() if not k.startswith(BASE_PREFIX)})
        if meta.get("draft_vocab") is not None:
            try:
                model.set_draft_vocab(meta["draft_vocab"])
            except (ValueError, TypeError, RuntimeError) as e:
                raise MultitokenError(f"corrupt draft_vocab in {heads_dir / HEADS_CONFIG}: {first_line(e)}") from None
        return model


def _read_heads_config(heads_dir: Path) -> tuple[dict, MTPConfig]:
    """(heads_config.json, its MTPConfig); a missing file is FileNotFoundError, a bad one MultitokenError."""
    path = heads_dir / HEADS_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"no {HEADS_CONFIG} in {heads_dir}: not a heads directory")
    meta = read_json(path, "heads config")
    try:
        return meta, MTPConfig.from_dict(meta["heads"])
    except (KeyError, TypeError) as e:
        raise MultitokenError(f"corrupt {path}: {first_line(e)}") from None


def _read_heads_weights(heads_dir: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file
    path = heads_dir / HEADS_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"no {HEADS_WEIGHTS} in {heads_dir}")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MultitokenError(f"corrupt {path}: {first_line(e)}") from None


def load_heads_model(base: str, heads_dir: str | None, dtype: torch.dtype | str = torch.float32,
                     fast_kernels: bool = True, fast_forward: bool = True):
    """(MTPHeadsForCausalLM with the saved heads, HFTokenizer) for `generate --base ... --heads ...`."""
    if heads_dir is None:  # checked before the (slow) base load
        raise MultitokenError("--base needs --heads DIR (heads trained with `multitoken heads train`)")
    model, tokenizer = load_base(base, dtype)
    heads = MTPHeadsForCausalLM.from_heads(model, heads_dir, model_identity(model, tokenizer),
                                           fast_kernels=fast_kernels, fast_forward=fast_forward)
    return heads.eval(), HFTokenizer(tokenizer)
