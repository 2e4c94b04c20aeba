"""Self-distillation data: requests as a chat model sees them, and the base's own greedy answers.

Heads trained on the base's greedy continuations see, when teacher-forced, the inputs decoding
feeds them (accepted tokens are the base's greedy tokens), which is what decides acceptance.
``multitoken heads train --generate-distill N`` puts these texts first in the hidden cache; in the
documents layout with their states as generation computed them (:func:`generate_distill_documents`).

The requests (:func:`distill_prompts`) cover what users ask a chat model: the broad offline mix of
:func:`multitoken.data.distill_requests` (stdlib-derived function / class / completion / review
tasks, templated questions, explanations, lists, emails, stories, advice), requests the model
writes itself from the chat template's user-turn prefix (Magpie-style :func:`self_instruct`), and
"Continue this Python code" on stdlib train-split snippets. None equals a benchmark prompt.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from multitoken.data import (
    CODE_INSTRUCTION, bench_prompts, clean_self_instruct, code_snippets, distill_requests, interleave,
    self_instruct_prefix,
)
from multitoken.data.requests import END_OF_TURN, normalize
from multitoken.hf.doc_packing import DocumentStates

CODE_EVERY = 4  # every 4th request is a code continuation (the rest: the broad mix)


@torch.inference_mode()
def self_instruct(model, tokenizer, n: int, seed: int = 0, batch_size: int = 64, max_new_tokens: int = 64,
                  temperature: float = 1.0, top_p: float = 0.95, max_rounds: int = 8,
                  progress: bool = False) -> list[str]:
    """Up to ``n`` user requests written by the chat model itself (Magpie): it continues the chat
    template's text up to a user message, sampled at ``temperature`` / ``top_p``; the outputs are
    cut at the end of the turn and filtered (:func:`multitoken.data.clean_self_instruct`), and any
    that equals a benchmark prompt is dropped. Deterministic for a seed."""
    prefix = tokenizer(self_instruct_prefix(tokenizer), add_special_tokens=False, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    banned = {normalize(p) for p in bench_prompts()}
    from tqdm import tqdm

    torch.manual_seed(seed)
    out: list[str] = []
    bar = tqdm(total=n, unit="request", desc="self-instruct", disable=not progress)
    for _ in range(max_rounds):
        if len(out) >= n:
            break
        ids = prefix.expand(batch_size, -1)  # (B, P)
        y = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=True, temperature=temperature, top_p=top_p, pad_token_id=eos)
        texts = tokenizer.batch_decode(y[:, prefix.shape[1]:], skip_special_tokens=False)
        seen = {normalize(r) for r in out} | banned
        out += [r for r in clean_self_instruct(texts, END_OF_TURN + (tokenizer.eos_token or END_OF_TURN[0],))
                if normalize(r) not in seen]
        bar.update(min(len(out), n) - bar.n)
    bar.close()
    return out[:n]


def distill_prompts(tokenizer, texts: Sequence[str], n: int, snippet_tokens: int = 96, model=None,
                    self_instruct_share: float = 0.25, seed: int = 0, progress: bool = False) -> list[str]:
    """About ``n`` prompts for self-distillation, as the base will see them.

    With a chat template (chat models): every :data:`CODE_EVERY`-th is "Continue this Python code"
    on a stdlib train-split snippet (the decode benchmark draws its code prompts from the validation
    split); the others come from :func:`multitoken.data.distill_requests`, which, when ``model`` is
    given, takes ``self_instruct_share`` of them from :func:`self_instruct`; each is wrapped in the
    template. Without a template: the first ``snippet_tokens`` tokens of ``texts``.
    """
    from multitoken.hf import apply_chat_template_or_fail

    if not getattr(tokenizer, "chat_template", None):
        heads = (tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:snippet_tokens]) for t in texts)
        return [h for h in heads if h.strip()][:n]
    n_code = n // CODE_EVERY
    code = [CODE_INSTRUCTION.format(code=c) for c in code_snippets(tokenizer, n_code, snippet_tokens, split="train")]
    share = round(self_instruct_share * (n - n_code)) if model is not None else 0
    extra = self_instruct(model, tokenizer, share, seed=seed, progress=progress) if share > 0 else []
    requests = distill_requests(n - len(code), seed=seed, extra=extra)
    return [apply_chat_template_or_fail(tokenizer, p) for p in interleave(requests, code, CODE_EVERY)][:n]


def length_batches(prompt_ids: Sequence[Sequence[int]], batch_size: int, seed: int) -> list[list[int]]:
    """Indices of ``prompt_ids`` in batches of next-to-equal length (all sorted by length, then cut),
    in a seeded random order: stopping early drops a random subset of prompts, not the longest."""
    by_length = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    batches = [by_length[s:s + batch_size] for s in range(0, len(by_length), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    return [batches[b] for b in order]


def left_padded(batch: Sequence[Sequence[int]], pad: int) -> tuple[Tensor, Tensor]:
    """Prompts (lists of ids) -> ids, attention mask, both (B, W) long, left-padded to the longest."""
    width = max(len(x) for x in batch)
    ids = torch.tensor([[pad] * (width - len(x)) + list(x) for x in batch])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
    return ids, mask


def answer_until_eos(answer: Sequence[int], eos: int | None) -> list[int]:
    """A generated row cut after its first ``eos`` (kept), or whole when there is none."""
    answer = list(answer)
    return answer[:answer.index(eos) + 1] if eos is not None and eos in answer else answer


def generate_distill_texts(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int = 128,
                           batch_size: int = 64, seed: int = 0, progress: bool = True) -> list[str]:
    """The base's own greedy answers to ``prompts`` (prompt + answer, up to and including EOS), from
    HF ``generate``, stopping once about ``n_tokens`` answer tokens are made; returned in the order
    of ``prompts``.

    Batches hold prompts of next-to-equal length (:func:`length_batches`), so left padding costs
    next to nothing. Batches cut from the prompts in their given order, each padded to its longest
    prompt, had made most of the prefill and much of the attention work waste (SmolLM2 on 2 cores,
    batches of 64: 123 answer tokens/s then, 292 now). Batched and single-prompt greedy answers
    can differ in rare near-ties, which does not matter for training data.
    """
    answered = _answered(model, tokenizer, prompts, n_tokens, new_tokens, batch_size, seed, progress)
    return [tokenizer.decode(ids, skip_special_tokens=False) for ids, _ in answered]


@torch.inference_mode()
def greedy_with_states(model, ids: Tensor, mask: Tensor, new_tokens: int, eos: int | None,
                       chunk: int = 1024) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy decoding of a left-padded batch that keeps every position's final-norm hidden state.

    ids, mask: (B, W) long. Runs the HF base with its KV cache as ``generate`` does (positions
    from the mask, rows that reached ``eos`` fed ``eos``), one pass more than ``generate``, so the
    last token's state exists too. Returns answers (B, S) long (S <= ``new_tokens``; after a row's
    EOS, EOS), states (B, W + S, d) float32 and greedy (B, W + S) long, the argmax of the base head
    on each state (over the prompt in chunks of ``chunk`` positions, so (B, W, V) logits never exist).
    """
    if new_tokens < 1:
        raise ValueError(f"new_tokens must be at least 1, got {new_tokens}")
    from transformers import DynamicCache

    from multitoken.hf.hf_forward import cache_keyword
    from multitoken.hf.hidden_cache import greedy_tokens

    base, head = model.base_model, model.get_output_embeddings()
    cache = {cache_keyword(model): DynamicCache(config=model.config)}  # filled in place by every pass
    positions = mask.cumsum(-1) - 1  # (B, W); padding at -1, masked out
    out = base(input_ids=ids, attention_mask=mask, position_ids=positions.clamp(min=0), use_cache=True, **cache)
    states = [out.last_hidden_state]  # [(B, W, d)]
    greedy = [greedy_tokens(model, out.last_hidden_state, chunk)]  # [(B, W)]
    nxt, done, answers = greedy[0][:, -1], torch.zeros(ids.shape[0], dtype=torch.bool), []
    for step in range(new_tokens):
        answers.append(nxt)
        if eos is not None:
            done |= nxt == eos
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
        out = base(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions[:, -1:] + 1 + step,
                   use_cache=True, **cache)
        states.append(out.last_hidden_state)  # (B, 1, d): the state of the token just fed
        greedy.append(head(out.last_hidden_state[:, -1]).argmax(-1)[:, None])
        if bool(done.all()):
            break
        nxt = greedy[-1][:, 0] if eos is None else greedy[-1][:, 0].masked_fill(done, eos)
    return torch.stack(answers, 1), torch.cat(states, 1).float(), torch.cat(greedy, 1)


def generate_distill_documents(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int = 128,
                               batch_size: int = 64, seed: int = 0, max_len: int | None = None,
                               progress: bool = True) -> list[DocumentStates]:
    """:func:`generate_distill_texts` that also keeps what a hidden cache of the documents layout
    stores (:class:`DocumentStates`), so those texts need no second forward through the base:
    a text's cached state is the one generation computed for it (equal up to batching numerics;
    the ids are the generated ones, never decoded and tokenised again). The answers come from
    :func:`greedy_with_states`, HF ``generate``'s greedy loop that keeps the states.

    Every document fits ``max_len`` tokens (a cache row, which would cut a longer text into pieces
    whose states differ from those of the whole text): a batch's answers stop at ``new_tokens`` or
    where its longest prompt would no longer fit, and prompts not shorter than a row are left out.
    Memory: 2d + 16 bytes per token held (SmolLM2-135M: ~1.2 KB; a million tokens ~1.2 GB).
    """
    answered = _answered(model, tokenizer, prompts, n_tokens, new_tokens, batch_size, seed, progress,
                         max_len=max_len, keep_states=True)
    return [DocumentStates(np.asarray(ids, dtype=np.int64), *kept) for ids, kept in answered]


@torch.inference_mode()
def _answered(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int, batch_size: int, seed: int,
              progress: bool, max_len: int | None = None, keep_states: bool = False) -> list[tuple[list[int], tuple]]:
    """(prompt + answer ids, (hidden (L, d) float16, greedy (L,)) numpy arrays or ()) per answered
    prompt, in prompt order, batches of :func:`length_batches` until ~``n_tokens`` answer tokens."""
    from tqdm import tqdm

    from multitoken.hf.hidden_cache import check_head_input

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if max_len is not None:
        kept = [x for x in encoded if len(x) < max_len]
        if len(kept) < len(encoded):
            tqdm.write(f"self-distillation: {len(encoded) - len(kept)} of {len(encoded)} prompts left out "
                       f"(not shorter than a cache row of {max_len} tokens)")
        encoded = kept
    answered: dict[int, tuple[list[int], tuple]] = {}
    bar = tqdm(total=n_tokens, unit="tok", desc="self-distillation", disable=not progress)
    made = 0
    for batch in length_batches(encoded, batch_size, seed):
        if made >= n_tokens:
            break
        ids, mask = left_padded([encoded[i] for i in batch], pad)
        width = ids.shape[1]
        if keep_states:
            room = new_tokens if max_len is None else min(new_tokens, max_len - width)  # each text fits a row
            answers, states, greedy = greedy_with_states(model, ids, mask, room, eos)
            if not answered:
                check_head_input(model, ids[-1:], None, states[-1:, :width])  # the longest prompt: no padding
        else:
            answers = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                     pad_token_id=pad, eos_token_id=eos)[:, width:]
        for row, (i, answer) in enumerate(zip(batch, answers.tolist())):
            answer = answer_until_eos(answer, eos)
            span = slice(width - len(encoded[i]), width + len(answer))
            answered[i] = (encoded[i] + answer, (states[row, span].to(torch.float16).numpy(),
                                                 greedy[row, span].numpy()) if keep_states else ())
            made += len(answer)
        bar.update(min(made, n_tokens) - bar.n)
    bar.close()
    return [answered[i] for i in sorted(answered)]
