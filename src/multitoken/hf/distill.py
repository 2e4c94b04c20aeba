"""Self-distillation data: requests as a chat model sees them, and the base's own greedy answers.

Heads trained on the base's greedy continuations see, when teacher-forced, the inputs decoding
feeds them (accepted tokens are the base's greedy tokens), which is what decides acceptance.
``multitoken heads train --generate-distill N`` prepends these texts to the hidden cache's stream.

The requests (:func:`distill_prompts`) cover what users ask a chat model: the broad offline mix of
:func:`multitoken.data.distill_requests` (stdlib-derived function / class / completion / review
tasks, templated questions, explanations, lists, emails, stories, advice), requests the model
writes itself from the chat template's user-turn prefix (Magpie-style :func:`self_instruct`), and
"Continue this Python code" on stdlib train-split snippets. None equals a benchmark prompt.
"""
from __future__ import annotations

from typing import Sequence

import torch

from multitoken.data import (
    CODE_INSTRUCTION, bench_prompts, clean_self_instruct, code_snippets, distill_requests, interleave,
    self_instruct_prefix,
)
from multitoken.data.requests import END_OF_TURN, normalize

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


@torch.inference_mode()
def generate_distill_texts(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int = 128,
                           batch_size: int = 64, seed: int = 0, progress: bool = True) -> list[str]:
    """The base's own greedy answers to ``prompts`` (prompt + answer, up to and including EOS),
    stopping once about ``n_tokens`` answer tokens are made; returned in the order of ``prompts``.

    Batches hold prompts of next-to-equal length (all prompts sorted by length, then cut), so
    left padding costs next to nothing. Batches cut from the prompts in their given order, each
    padded to its longest prompt, had made most of the prefill and much of the attention work
    waste (SmolLM2 on 2 cores, batches of 64: 123 answer tokens/s then, 292 now). The batches
    run in a seeded random order, so stopping at ``n_tokens`` drops a random subset of prompts,
    not the longest ones. Batched and single-prompt greedy answers can differ in rare near-ties,
    which does not matter for training data.
    """
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_length = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    batches = [by_length[s:s + batch_size] for s in range(0, len(by_length), batch_size)]
    order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(seed)).tolist()
    answered: dict[int, str] = {}
    bar = tqdm(total=n_tokens, unit="tok", desc="self-distillation", disable=not progress)
    made = 0
    for b in order:
        if made >= n_tokens:
            break
        batch = [encoded[i] for i in batches[b]]
        width = len(batch[-1])
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch])  # (B, width), left-padded
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch])
        y = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for i, prompt, answer in zip(batches[b], batch, y):
            answer = answer[:answer.index(eos) + 1] if eos in answer else answer
            made += len(answer)
            answered[i] = tokenizer.decode(prompt + answer, skip_special_tokens=False)
        bar.update(min(made, n_tokens) - bar.n)
    bar.close()
    return [answered[i] for i in sorted(answered)]
