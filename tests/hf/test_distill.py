"""Self-distillation data (hf/distill.py) on a tiny random HF Llama (no network, seconds)."""
import numpy as np
import pytest

pytest.importorskip("transformers")
import torch  # noqa: E402
from hf_fixtures import TEXTS, make_model, make_tokenizer  # noqa: E402

from multitoken.data import bench_prompts  # noqa: E402
from multitoken.data.requests import normalize  # noqa: E402
from multitoken.hf.distill import (  # noqa: E402
    answer_until_eos, distill_prompts, generate_distill_documents, generate_distill_texts, greedy_with_states,
    left_padded, self_instruct,
)

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def test_distill_prompts_plain_and_chat():
    tok = make_tokenizer()
    plain = distill_prompts(tok, TEXTS, 3, snippet_tokens=5)
    assert plain == [" ".join(t.split()[:5]) for t in TEXTS[:3]]
    tok.chat_template = CHAT_TEMPLATE
    chat = distill_prompts(tok, TEXTS, 8)
    assert len(chat) == 8 and all(p.startswith("user ") and p.endswith("assistant") for p in chat)
    assert ["Continue this Python code" in p for p in chat] == [False, False, False, True] * 2  # every CODE_EVERY-th
    bench = {normalize(p) for p in bench_prompts()}
    requests = [p[len("user "):-len("\nassistant")] for p in chat]
    assert len(set(requests)) == 8 and not {normalize(r) for r in requests} & bench


class ScriptedWriter:
    """A stand-in chat model whose sampled continuations are fixed texts (one per batch row, cycling)."""

    def __init__(self, tok, texts):
        self.tok, self.texts, self.calls = tok, texts, []

    def generate(self, input_ids, max_new_tokens, **kw):
        self.calls.append(kw)
        rows = [self.tok(self.texts[i % len(self.texts)], add_special_tokens=False)["input_ids"][:max_new_tokens]
                for i in range(input_ids.shape[0])]
        width = max(map(len, rows))
        tail = torch.tensor([r + [0] * (width - len(r)) for r in rows])  # padded with <unk>: no end of turn
        return torch.cat([input_ids, tail], 1)


def test_self_instruct_requests_come_from_the_model_and_are_cleaned():
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    writer = ScriptedWriter(tok, ["print the a of to and is it <eos> if", "x y <eos>",  # too short: dropped
                                  "print the a of to and is it <eos>",  # a repeat: dropped
                                  "while true print x", "return the a of self with class <eos>"])  # no end: dropped
    got = self_instruct(writer, tok, 5, seed=0, batch_size=5, max_new_tokens=12, max_rounds=2)
    assert got == ["print the a of to and is it", "return the a of self with class"]
    assert writer.calls[0]["do_sample"] and writer.calls[0]["temperature"] == 1.0
    mixed = distill_prompts(tok, TEXTS, 8, model=writer, self_instruct_share=0.5)
    assert len(mixed) == 8 and sum("print the a of to and is it" in p for p in mixed) == 1


def test_batched_distill_answers_equal_single_prompt_greedy():
    model, tok = make_model(eos=1), make_tokenizer()
    prompts = ["def x if", "the a of to and is it", "return y"]
    texts = generate_distill_texts(model, tok, prompts, n_tokens=10 ** 6, new_tokens=12, batch_size=2,
                                   progress=False)
    assert len(texts) == 3
    for prompt in prompts:
        ids = tok(prompt, add_special_tokens=False, return_tensors="pt").input_ids
        ref = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=1, eos_token_id=1)
        assert tok.decode(ref[0].tolist(), skip_special_tokens=False) in texts
    few = generate_distill_texts(model, tok, prompts, n_tokens=1, new_tokens=12, batch_size=2, progress=False)
    assert len(few) in (1, 2) and all(t in texts for t in few)  # stops after the first batch it ran


class WidthRecorder:
    """Wraps a model's ``generate`` and records each batch's prompt lengths (from the mask)."""

    def __init__(self, model):
        self.model, self.lengths = model, []

    def generate(self, attention_mask, **kw):
        self.lengths.append(sorted(attention_mask.sum(1).tolist()))
        return self.model.generate(attention_mask=attention_mask, **kw)


def test_distill_batches_hold_prompts_of_similar_length_and_answers_keep_prompt_order():
    model, tok = make_model(eos=1), make_tokenizer()
    prompts = ["def", "the a of to and is it if", "return y", "x y the a of to and is"]  # 1, 8, 2, 8 tokens
    recorder = WidthRecorder(model)
    texts = generate_distill_texts(recorder, tok, prompts, n_tokens=10 ** 6, new_tokens=6, batch_size=2,
                                   progress=False)
    assert sorted(recorder.lengths) == [[1, 2], [8, 8]]  # not [1, 8] and [2, 8]: no batch pads 7 positions
    assert [t.startswith(p) for t, p in zip(texts, prompts)] == [True] * 4


def alone(model, ids: list[int]):
    """Final-norm states (L, d) and greedy tokens (L,) of one text run alone through the HF forward."""
    with torch.inference_mode():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0], out.logits[0].argmax(-1)


@pytest.mark.parametrize("eos", [1, None])
def test_greedy_with_states_is_hf_greedy_and_keeps_each_texts_states(eos):
    model, tok = make_model(eos=eos), make_tokenizer()
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("def x if", "the a of to and is it", "return y")]
    ids, mask = left_padded(prompts, pad=1)
    answers, states, greedy = greedy_with_states(model, ids, mask, new_tokens=12, eos=eos)
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=1,
                         eos_token_id=eos)[:, ids.shape[1]:]
    width = ids.shape[1]
    for row, prompt in enumerate(prompts):
        answer = answer_until_eos(answers[row].tolist(), eos)
        assert answer == answer_until_eos(ref[row].tolist(), eos)
        h, g = alone(model, prompt + answer)
        span = slice(width - len(prompt), width + len(answer))  # the last token's state too
        assert torch.allclose(states[row, span], h, atol=1e-4) and torch.equal(greedy[row, span], g)
    assert states.shape[1] == greedy.shape[1] == width + answers.shape[1]


def test_distill_documents_are_the_distill_texts_with_their_states():
    model, tok = make_model(eos=1), make_tokenizer()
    prompts = ["def x if", "the a of to and is it", "return y", "x y the a of"]
    texts = generate_distill_texts(model, tok, prompts, n_tokens=10 ** 6, new_tokens=12, batch_size=2,
                                   progress=False)
    docs = generate_distill_documents(model, tok, prompts, n_tokens=10 ** 6, new_tokens=12, batch_size=2,
                                      progress=False)
    assert [tok.decode(d.ids.tolist(), skip_special_tokens=False) for d in docs] == texts
    for d in docs:
        h, g = alone(model, d.ids.tolist())
        assert d.hidden.dtype == np.float16 and torch.allclose(torch.from_numpy(d.hidden).float(), h, atol=1e-2)
        assert torch.equal(torch.from_numpy(d.greedy), g)
    fit = generate_distill_documents(model, tok, prompts, n_tokens=10 ** 6, new_tokens=12, batch_size=1,
                                     max_len=7, progress=False)  # the 7-token prompt is left out
    assert len(fit) == 3 and all(len(d.ids) <= 7 for d in fit)
    for d, whole in zip(fit, [d for i, d in enumerate(docs) if i != 1]):  # the answers cut to fit a row
        assert d.ids.tolist() == whole.ids.tolist()[:len(d.ids)] and len(d.ids) in (7, len(whole.ids))
