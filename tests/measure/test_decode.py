"""The decode benchmark on tiny random HF bases: batches, per-row identity, groups, drop vs mask."""
import pytest
import torch
from conftest import hf_greedy
from hf_fixtures import make_arch, make_tokenizer

pytest.importorskip("transformers")

from multitoken.errors import MultitokenError  # noqa: E402
from multitoken.hf import HFTokenizer, MTPHeadsForCausalLM  # noqa: E402
from multitoken.measure.decode import (  # noqa: E402
    KeepFinishedRows, bench_decode, hf_generate_rows, make_batches)
from multitoken.measure.decode_run import all_identical, bench_prompts, choose_decoders, run_decode_bench  # noqa: E402

VOCAB = 16


@pytest.fixture(scope="module")
def model():
    base = make_arch("llama", 11, vocab=VOCAB)
    wrapped = MTPHeadsForCausalLM(base, 4, "sequential")
    for p in wrapped.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    return wrapped


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [("code" if i % 3 else "prose", torch.randint(1, VOCAB, (2 + (5 * i) % 7,), generator=g).tolist())
            for i in range(n)]


def test_hf_generate_rows_equals_each_rows_own_greedy(model):
    rows = [p for _, p in prompts(3)]
    tokens, wall, stats = hf_generate_rows(model.base, rows, 8, None, None)
    assert wall > 0 and stats is None
    assert tokens == [hf_greedy(model.base, torch.tensor([r]), 8) for r in rows]
    eos = tokens[0][2]
    cut, _, _ = hf_generate_rows(model.base, rows, 8, eos, None)
    assert cut == [t[: t.index(eos) + 1] if eos in t else t for t in tokens]


def test_batches_hold_one_group_and_groups_take_turns():
    pairs = [("a", [1]), ("a", [2]), ("b", [3]), ("a", [4]), ("b", [5])]
    assert make_batches(pairs, 2) == [("a", [[1], [2]]), ("b", [[3], [5]]), ("a", [[4]])]
    assert make_batches(pairs, 1)[:2] == [("a", [[1]]), ("b", [[3]])]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batched_bench_rows_are_identical_per_prompt(model, batch_size):
    decoders = choose_decoders(model, ["hf_pld", "ar", "spec", "tree"], batch_size=batch_size,
                               mask_finished=batch_size > 1)
    assert ("hf_pld" in decoders) == (batch_size == 1)
    result = bench_decode(model, prompts(7), decoders, max_new_tokens=10, eos_id=None, batch_size=batch_size,
                          progress=False, keep_tokens=True)
    assert result["batch_size"] == batch_size and len(result["per_prompt"]) == 7
    assert len(result["per_batch"]) == (7 if batch_size == 1 else 3)  # prose 3 -> 1 batch, code 4 -> 2
    assert {r["group"] for r in result["rows"]} == {"code", "prose", "all"}
    multitoken = [r for r in result["rows"] if r["decoder"] != "hf" and r["decoder"] != "hf_pld"]
    assert all(r["identical"] and r["prompts"] in (3, 4, 7) for r in multitoken), multitoken
    assert all_identical(result)
    if batch_size > 1:
        assert {r["decoder"] for r in result["rows"]} >= {"spec:mask", "tree:mask", "ar:mask"}
    first = result["per_prompt"][0]
    assert first["spec"]["ids"] == hf_greedy(model.base, torch.tensor([prompts(7)[0][1]]), 10)
    spec = next(r for r in result["rows"] if r["group"] == "all" and r["decoder"] == "spec")
    assert spec["tau"] >= 1.0 and spec["new_tokens"] == 70


def test_masking_finished_rows_gives_the_same_tokens(model):
    from multitoken.decoding import generate
    rows = [torch.tensor(p) for _, p in prompts(4, seed=3)]
    free = generate(model, rows, 12, mode="spec").tokens
    eos = free[1][3]
    masked = KeepFinishedRows(model)
    assert not hasattr(masked, "select_rows") and masked.vocab_size == VOCAB
    assert generate(masked, rows, 12, mode="tree", eos_id=eos).tokens == \
        generate(model, rows, 12, mode="tree", eos_id=eos).tokens


def test_bad_decoders_and_batch_sizes_are_refused(model):
    with pytest.raises(MultitokenError, match="one prompt at a time"):
        bench_decode(model, prompts(2), ["hf", "hf_pld"], 4, batch_size=2, progress=False)
    with pytest.raises(MultitokenError, match="unknown decoder"):
        bench_decode(model, prompts(2), ["hf", "hf:mask"], 4, progress=False)
    with pytest.raises(MultitokenError, match="batch size"):
        bench_decode(model, prompts(2), ["ar"], 4, batch_size=0, progress=False)


def test_bench_prompts_are_the_requests_by_group_plus_code_continuations(model):
    tok = HFTokenizer(make_tokenizer(chat=True))
    chat_prompts, chat = bench_prompts(model, tok, 0, 0, code_prompts=2, per_group=2)
    groups = [g for g, _ in chat_prompts]
    assert chat and groups.count("continue") == 2 and {"code", "complete", "prose"} <= set(groups)
    assert all(groups.count(g) == 2 for g in set(groups))


def test_run_decode_bench_markdown_says_the_batch(model):
    tok = HFTokenizer(make_tokenizer(chat=True))
    result, table = run_decode_bench(model, tok, "tiny", prompts(4), True, ["hf", "ar", "spec"], 6,
                                     progress=False, batch_size=2)
    assert "batch size 2" in table and "**code**" in table and "| spec |" in table
