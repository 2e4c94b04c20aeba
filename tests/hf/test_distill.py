"""Self-distillation data (hf/distill.py) on a tiny random HF Llama (no network, seconds)."""
import pytest

pytest.importorskip("transformers")
from hf_fixtures import TEXTS, make_model, make_tokenizer  # noqa: E402

from multitoken.data import PROSE_PROMPTS, prose_tasks  # noqa: E402
from multitoken.hf.distill import distill_prompts, generate_distill_texts  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


def test_distill_prompts_plain_and_chat():
    tok = make_tokenizer()
    plain = distill_prompts(tok, TEXTS, 3, snippet_tokens=5)
    assert plain == [" ".join(t.split()[:5]) for t in TEXTS[:3]]
    tok.chat_template = CHAT_TEMPLATE
    chat = distill_prompts(tok, TEXTS, 6)
    assert len(chat) == 6 and all(p.startswith("user ") and p.endswith("assistant") for p in chat)
    assert ["Continue this Python code" in p for p in chat] == [True, False] * 3
    tasks = prose_tasks()
    assert len(set(tasks)) == len(tasks) == 400 and not set(PROSE_PROMPTS) & set(tasks)


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
    assert len(few) == 2  # stops after the first batch once n_tokens answer tokens exist
