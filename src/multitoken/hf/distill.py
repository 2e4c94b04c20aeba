"""Self-distillation data: prompts as a chat model sees them, and the base's own greedy answers.

Heads trained on the base's greedy continuations see, when teacher-forced, the inputs decoding
feeds them (accepted tokens are the base's greedy tokens), which is what decides acceptance.
``multitoken heads train --generate-distill N`` prepends these texts to the hidden cache's stream.
"""
from __future__ import annotations

from typing import Sequence

import torch

from multitoken.data import CODE_INSTRUCTION, code_snippets, interleave, prose_tasks


def distill_prompts(tokenizer, texts: Sequence[str], n: int, snippet_tokens: int = 96) -> list[str]:
    """About ``n`` prompts for self-distillation, as the base will see them.

    With a chat template (chat models): half "Continue this Python code" requests on snippets of
    the stdlib's train split (the decode benchmark draws its code prompts from the validation
    split), half prose instructions from :func:`multitoken.data.prose_tasks`, alternating, each
    wrapped in the template. Without one: the first ``snippet_tokens`` tokens of ``texts``.
    """
    from multitoken.hf import apply_chat_template_or_fail

    if not getattr(tokenizer, "chat_template", None):
        heads = (tokenizer.decode(tokenizer(t, add_special_tokens=False)["input_ids"][:snippet_tokens]) for t in texts)
        return [h for h in heads if h.strip()][:n]
    code = [CODE_INSTRUCTION.format(code=c) for c in code_snippets(tokenizer, (n + 1) // 2, snippet_tokens, split="train")]
    prose = prose_tasks()[:n - len(code)]
    return [apply_chat_template_or_fail(tokenizer, p) for p in interleave(code, prose, 2)]


@torch.inference_mode()
def generate_distill_texts(model, tokenizer, prompts: Sequence[str], n_tokens: int, new_tokens: int = 128,
                           batch_size: int = 32, progress: bool = True) -> list[str]:
    """The base's own greedy answers to ``prompts`` (prompt + answer, up to and including EOS),
    stopping once about ``n_tokens`` answer tokens are made.

    Prompts run in batches of similar length, left-padded; batched and single-prompt greedy
    answers can differ in rare near-ties, which does not matter for training data.
    """
    from tqdm import tqdm

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    out: list[str] = []
    bar = tqdm(total=n_tokens, unit="tok", desc="self-distillation", disable=not progress)
    made = 0
    for start in range(0, len(encoded), batch_size):
        if made >= n_tokens:
            break
        batch = sorted(encoded[start:start + batch_size], key=len)
        width = len(batch[-1])
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch])  # (B, width), left-padded
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        y = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
        for prompt, answer in zip(batch, y):
            answer = answer[:answer.index(eos) + 1] if eos in answer else answer
            made += len(answer)
            out.append(tokenizer.decode(prompt + answer, skip_special_tokens=False))
        bar.update(min(made, n_tokens) - bar.n)
    bar.close()
    return out
