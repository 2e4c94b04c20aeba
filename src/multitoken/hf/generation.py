"""The Python API Hugging Face users expect, on :class:`~multitoken.hf.wrapper.MTPHeadsForCausalLM`:

    model = MTPHeadsForCausalLM.from_pretrained("smollm2")          # base + its shipped heads
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=64)   # (B, T + new) like HF

``from_pretrained`` takes a base (a model object, ``"smollm2"``, a model folder or a ``.gguf``
file) and heads (a heads folder, a shipped name, or None for the set shipped for that base) and
checks that the heads were trained for that base. ``generate`` strips left padding per row
(``attention_mask``), decodes the batch with :func:`multitoken.generate` (the detailed entry,
with its statistics) and pads each row after its EOS with ``pad_token_id``, as HF's
``generate`` does.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from multitoken.decoding import generate as decode
from multitoken.errors import MultitokenError
from multitoken.hf.heads_files import recorded_fingerprint
from multitoken.hf.loading import load_base, model_identity
from multitoken.hf.shipped import resolve_heads, shipped_heads


def shipped_heads_for(model) -> "os.PathLike":
    """The shipped heads folder recorded for ``model``'s weights (matched by fingerprint)."""
    fingerprint = model_identity(model)["fingerprint"]
    for name in shipped_heads():
        folder = resolve_heads(name)
        if recorded_fingerprint(folder) == fingerprint:
            return folder
    raise MultitokenError("no ready-made heads were trained for this base model; pass heads=DIR "
                          "(heads trained with `multitoken heads train`)")


def prompt_rows(input_ids: Tensor, attention_mask: Tensor | None) -> list[Tensor]:
    """input_ids (B, T) or (T,) -> one 1-D row per prompt, keeping the positions attention_mask marks
    (left or right padding stripped); no mask keeps every token."""
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2:
        raise MultitokenError(f"input_ids must be (B, T), got shape {tuple(ids.shape)}")
    if attention_mask is None:
        return list(ids)
    mask = torch.as_tensor(attention_mask, device=ids.device)
    mask = mask[None] if mask.dim() == 1 else mask
    if mask.shape != ids.shape:
        raise MultitokenError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
    return [row[m.bool()] for row, m in zip(ids, mask)]


def hf_style_output(input_ids: Tensor, new_tokens: list[list[int]], pad_token_id: int) -> Tensor:
    """input_ids (B, T) followed by each row's new tokens, padded with pad_token_id to the longest
    -> (B, T + max new) long, what HF's ``generate`` returns."""
    ids = torch.as_tensor(input_ids)
    ids = ids[None] if ids.dim() == 1 else ids
    width = max((len(t) for t in new_tokens), default=0)
    out = torch.full((ids.shape[0], ids.shape[1] + width), pad_token_id, dtype=torch.long, device=ids.device)
    out[:, : ids.shape[1]] = ids
    for b, tokens in enumerate(new_tokens):
        out[b, ids.shape[1]: ids.shape[1] + len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return out


def single_eos(eos) -> int | None:
    """One EOS id from an int, a one-element list or None (multitoken stops on one id)."""
    if isinstance(eos, (list, tuple)):
        if len(set(eos)) > 1:
            raise MultitokenError(f"multitoken stops on one EOS id, got {list(eos)}; pass eos_token_id=ID")
        eos = eos[0] if eos else None
    return None if eos is None else int(eos)


class HFGenerationMixin:
    """``from_pretrained`` and an HF-style ``generate`` for the wrapper (which supplies
    ``from_heads``, ``base``, ``n_future`` and the decode protocol)."""

    tokenizer = None  # the base's tokenizer, when from_pretrained loaded or was given one
    heads_dir = None  # the folder the heads came from (its tree.json is the default tree)

    @classmethod
    def from_pretrained(cls, base, heads: str | os.PathLike | None = None, *, tokenizer=None,
                        dtype: torch.dtype | str = torch.float32, fast_kernels: bool = True,
                        fast_forward: bool = True):
        """A base with MTP heads, the base's identity checked against the heads'.

        base: an HF causal LM object (``tokenizer`` optional: recorded and used for the vocabulary
        check), or ``"smollm2"``, a model folder or a ``.gguf`` file (loaded in ``dtype``, with its
        tokenizer). heads: a heads folder, a shipped name (``"smollm2"``) or None (the set shipped
        for this base). Raises MultitokenError when no heads fit (HeadsMismatchError for another base's).
        """
        if isinstance(base, (str, os.PathLike)):
            heads_dir = resolve_heads(heads, os.fspath(base))  # before the (slow) base load
            base, tokenizer = load_base(os.fspath(base), dtype)
        else:
            heads_dir = resolve_heads(heads) if heads is not None else shipped_heads_for(base)
        model = cls.from_heads(base.eval(), heads_dir, model_identity(base, tokenizer),
                               fast_kernels=fast_kernels, fast_forward=fast_forward)
        model.tokenizer, model.heads_dir = tokenizer, heads_dir
        return model.eval()

    @torch.no_grad()
    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None, max_new_tokens: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 mode: str = "tree", seed: int | None = None, **decode_kw) -> Tensor:
        """HF-style generation: (B, T + new) long, input_ids followed by the new tokens, rows padded
        after their EOS with pad_token_id.

        Unset ``max_new_tokens`` / ``eos_token_id`` / ``pad_token_id`` come from the base's
        ``generation_config`` (pad falls back to EOS, then 0). ``mode``: "tree" (the library's default
        tree: cost-aware from the heads folder's tree.json acceptance table, with prompt-lookup
        branches grafted on where they pay), "spec" (a chain) or "ar" (plain). Greedy output
        equals the base's own greedy decoding; sampling keeps its distribution. ``decode_kw``
        (num_draft, tree, tree_budget, prompt_lookup, draft_cost, ...) goes to :func:`multitoken.generate`.
        """
        config = self.base.generation_config
        eos = single_eos(eos_token_id if eos_token_id is not None else config.eos_token_id)
        pad = next((p for p in (pad_token_id, config.pad_token_id, eos) if p is not None), 0)
        pad = single_eos(pad)
        max_new = max_new_tokens if max_new_tokens is not None else (config.max_new_tokens or 20)
        if do_sample and not temperature > 0:
            raise MultitokenError(f"do_sample=True needs temperature > 0, got {temperature}")
        sample = {"temperature": temperature, "top_k": top_k, "top_p": top_p} if do_sample else {}
        result = decode(self, prompt_rows(input_ids, attention_mask), max_new, mode=mode, eos_id=eos, seed=seed,
                        **sample, **decode_kw)
        return hf_style_output(input_ids, result.tokens, pad)
