"""Batches of prompts of different lengths on wrapped HF bases: every row equals its own base.generate."""
import warnings

import pytest
import torch
from conftest import hf_greedy
from hf_fixtures import ARCHS, make_arch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from multitoken.decoding import generate  # noqa: E402
from multitoken.hf import MTPHeadsForCausalLM  # noqa: E402

VOCAB = 16  # a small vocabulary, so random heads' drafts are sometimes accepted


def wrapped(base, head_type="sequential", std=0.3, **kw):
    model = MTPHeadsForCausalLM(base, 4, head_type, **kw)
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return model


def random_rows(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(ARCHS), head_type=st.sampled_from(["residual", "sequential", "linear"]),
       seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 10), min_size=2, max_size=4))
def test_batched_greedy_rows_equal_their_own_base_generate(arch, head_type, seed, lengths):
    """ar / spec / tree on a ragged batch through the lean forward (per-row lengths, accept counts
    and tree compaction) reproduce each row's single-prompt HF greedy output."""
    base = make_arch(arch, seed, vocab=VOCAB)
    torch.manual_seed(seed)
    model = wrapped(base, head_type)
    assert model.lean_forward is not None
    rows = random_rows(lengths, seed)
    refs = [hf_greedy(base, r[None], 12) for r in rows]
    for mode in ("ar", "spec", "tree"):
        assert generate(model, rows, 12, mode=mode).tokens == refs, mode


def test_draft_vocabulary_and_kernels_in_a_batch_of_eight():
    """B x W rows of a verify pass (8 rows x a 4-token chain, trees wider) through the oneDNN
    kernels, with drafts over a draft vocabulary."""
    base = make_arch("llama", 3, vocab=VOCAB)
    model = wrapped(base, "sequential")
    model.set_draft_vocab(list(range(0, VOCAB, 2)))
    rows = random_rows([3, 9, 1, 6, 12, 4, 7, 2], 3)
    refs = [hf_greedy(base, r[None], 10) for r in rows]
    for mode in ("spec", "tree"):
        assert generate(model, rows, 10, mode=mode).tokens == refs, mode


def test_sampling_runs_in_batches():
    model = wrapped(make_arch("qwen2", 1, vocab=VOCAB), "residual")
    rows = random_rows([2, 8, 5], 1)
    for mode in ("ar", "spec", "tree"):
        out = generate(model, rows, 9, mode=mode, temperature=0.8, top_p=0.9, top_k=8, seed=0)
        assert [len(t) for t in out.tokens] == [9, 9, 9]
        assert all(0 <= x < VOCAB for t in out.tokens for x in t)


def _eos_mid_block_case(model, rows, max_new):
    """(row, eos id) where, without EOS, a step emitted several tokens for ``row`` and the first
    of them appears nowhere earlier in that row, and some other row never emits it; None if no such step."""
    chunks = [[] for _ in rows]
    generate(model, rows, max_new, mode="spec", cost_model="off", on_tokens=lambda r, t: chunks[r].append(list(t)))
    for r, row_chunks in enumerate(chunks):
        seen = []
        for chunk in row_chunks:
            t = chunk[0]
            if len(chunk) >= 2 and t not in seen and any(
                    t not in sum(other, []) for o, other in enumerate(chunks) if o != r):
                return r, t
            seen += chunk
    return None


def test_a_row_ending_on_eos_mid_block_while_others_continue():
    for seed in range(12):
        base = make_arch("llama", seed, vocab=VOCAB)
        torch.manual_seed(seed)
        model = wrapped(base, "sequential", std=0.5)
        rows = random_rows([4, 9, 6], seed)
        case = _eos_mid_block_case(model, rows, 16)
        if case is None:
            continue
        row, eos = case
        refs = [hf_greedy(base, r[None], 16) for r in rows]
        expected = [ref[: ref.index(eos) + 1] if eos in ref else ref for ref in refs]
        for mode in ("spec", "tree"):
            out = generate(model, rows, 16, mode=mode, eos_id=eos, cost_model="off")  # every step drafts all heads
            assert out.tokens == expected, (seed, mode)
        assert any(len(e) > len(expected[row]) for e in expected)  # another row went on
        return
    pytest.fail("no seed gave a step that accepted drafts after a fresh token")


def test_select_rows_keeps_only_those_rows():
    """A state reduced to rows [2, 0] verifies exactly as a batch of those two prompts would."""
    model = wrapped(make_arch("mistral", 2, vocab=VOCAB), "sequential")
    rows = random_rows([5, 3, 8], 2)
    state = model.new_state(3, 32)
    padded = torch.zeros(3, 8, dtype=torch.long)
    for i, r in enumerate(rows):
        padded[i, : len(r)] = r
    model.verify(state, padded)
    model.accept(state, None, torch.tensor([5, 3, 8]))
    kept = model.select_rows(state, torch.tensor([2, 0]))
    assert kept.lengths.tolist() == [8, 5]
    fresh = model.new_state(2, 32)
    model.verify(fresh, torch.stack([padded[2], padded[0]]))
    model.accept(fresh, None, torch.tensor([8, 5]))
    block = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(model.verify(kept, block), model.verify(fresh, block), atol=1e-5, rtol=1e-4)
    pick = lambda logits, j: logits.argmax(-1)  # noqa: E731
    torch.testing.assert_close(model.draft(kept, block[:, 0], 3, pick)[1], model.draft(fresh, block[:, 0], 3, pick)[1],
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(IndexError):
        model.select_rows(state, torch.tensor([0, 0]))


@pytest.mark.parametrize("fast_forward", [True, False])
def test_batches_without_the_lean_forward_run_row_by_row_and_say_so_once(fast_forward):
    """GPT-2 (no lean forward) or fast_forward=False: one DynamicCache per row, one warning per batch decode."""
    if fast_forward:
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                          initializer_range=0.5)).eval()
        base.generation_config.eos_token_id = None
        kw = {"pad_token_id": 0}
    else:
        base, kw = make_arch("llama", 4, vocab=VOCAB), {}
    model = wrapped(base, "sequential", fast_forward=fast_forward)
    assert model.lean_forward is None
    rows = random_rows([3, 7, 5], 4)
    refs = [hf_greedy(base, r[None], 10, **kw) for r in rows]
    for mode in ("ar", "spec", "tree"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert generate(model, rows, 10, mode=mode).tokens == refs, mode
        said = [w for w in caught if "one row at a time" in str(w.message)]
        assert len(said) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(model, rows[:1], 4, mode="spec")  # batch 1: nothing to say
