"""Exactness of every decoder against plain greedy decoding, lossless sampling, edge cases."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import multitoken.decoding.chain as chain
from multitoken.decoding import Sampler, generate
from multitoken.errors import MultitokenError
from conftest import HEAD_TYPES, tiny_model, RankedStub

# ----------------------------------------------------------------------------- exactness


@settings(max_examples=40, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 100_000), batch=st.integers(1, 4),
       vocab=st.sampled_from([5, 8, 48]), max_new=st.integers(0, 24), data=st.data())
def test_spec_draft_and_batched_greedy_equal_plain_greedy(head_type, seed, batch, vocab, max_new, data):
    model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=vocab)
    g = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch))
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    eos = data.draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    plain = [generate(model, [p], max_new, eos_id=eos).tokens[0] for p in prompts]  # one row at a time
    assert generate(model, prompts, max_new, eos_id=eos).tokens == plain  # batched plain
    num_draft = data.draw(st.integers(1, 3))
    spec = generate(model, prompts, max_new, mode="spec", num_draft=num_draft, eos_id=eos)
    assert spec.tokens == plain
    drafter = tiny_model("residual", n_future=1, seed=seed + 1, vocab_size=vocab)
    assert generate(model, prompts, max_new, mode="draft", draft_model=drafter, num_draft=3, eos_id=eos).tokens == plain
    # a perfect drafter (the model itself) exercises full acceptance
    assert generate(model, prompts, max_new, mode="draft", draft_model=model, num_draft=2, eos_id=eos).tokens == plain


def test_spec_exercises_partial_acceptance_and_stays_exact():
    """Aggregate check that the property test's models really accept and reject drafts."""
    histogram = torch.zeros(4, dtype=torch.long)
    for seed in range(12):
        for head_type in HEAD_TYPES:
            model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=6)
            prompts = [torch.randint(0, 6, (n,), generator=torch.Generator().manual_seed(seed)) for n in (2, 5)]
            out = generate(model, prompts, 20, mode="spec", cost_model="off")  # all heads every step
            assert out.tokens == generate(model, prompts, 20).tokens
            histogram += torch.tensor(out.stats.accepted_histogram)
    assert histogram[0] > 0 and histogram[1:3].sum() > 0 and histogram[3] > 0


def test_plain_sampling_is_reproducible_with_a_seed():
    model = tiny_model("residual", seed=3)
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    b = generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    c = generate(model, prompt, 20, temperature=1.0, top_k=10, top_p=0.9, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_stats_of_plain_decoding():
    model = tiny_model("residual", seed=3)
    out = generate(model, torch.tensor([[1, 2, 3], [4, 5, 6]]), 10)
    assert out.stats.forward_passes == 10 and out.stats.new_tokens == 20 and out.stats.tau == 1.0
    assert out.stats.tokens_per_s > 0 and out.stats.wall_s > 0


# ----------------------------------------------------------------------------- scripted stub (conftest.RankedStub)


SCRIPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 4


@pytest.mark.parametrize("rank,tau,hist_at", [
    (lambda n, j: 0, 4.0, 3),                   # all accepted: 3 drafts + bonus per pass
    (lambda n, j: 1, 1.0, 0),                   # all rejected: the bonus only
    (lambda n, j: 1 if j == 2 else 0, 2.0, 1),  # partial: first draft right, second wrong
])
def test_scripted_acceptance(rank, tau, hist_at):
    model = RankedStub(SCRIPT, rank)
    out = generate(model, torch.tensor([[1, 2]]), 1 + 12, mode="spec")  # 1 from prefill + 12 in verify passes
    assert out.tokens[0] == SCRIPT[2:15]
    hist = out.stats.accepted_histogram
    assert hist[hist_at] == sum(hist) > 0
    assert out.stats.forward_passes == 1 + int(12 / tau)


def test_eos_inside_an_accepted_block_stops_there():
    model = RankedStub(SCRIPT)
    out = generate(model, torch.tensor([[1, 2]]), 50, mode="spec", eos_id=6)  # 6 is the 2nd token of a block
    assert out.tokens[0] == [3, 4, 5, 6]
    assert out.tokens == generate(model, torch.tensor([[1, 2]]), 50, eos_id=6).tokens


def test_max_new_tokens_reached_mid_block():
    model = RankedStub(SCRIPT)
    for max_new in range(0, 9):
        out = generate(model, torch.tensor([[1, 2]]), max_new, mode="spec")
        assert out.tokens[0] == SCRIPT[2:2 + max_new]


# ----------------------------------------------------------------------------- lossless sampling


def chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile (z=3.719: p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def exact_first_tokens_distribution(model, prompt, n_tokens, sampler):
    """P(first n generated tokens) under plain sampling, by enumerating every sequence."""
    V = model.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(V)] * n_tokens).reshape(-1, n_tokens)
    full = torch.cat([prompt.expand(len(seqs), -1), seqs], 1)
    with torch.no_grad():
        probs = sampler.probs(model(full)[:, :, 0])  # (N, T, V)
    p = torch.ones(len(seqs))
    for i in range(n_tokens):
        p = p * probs[torch.arange(len(seqs)), prompt.shape[1] - 1 + i, seqs[:, i]]
    return seqs, p


def chi2_against(seqs, p, samples):
    index = {tuple(s.tolist()): i for i, s in enumerate(seqs)}
    counts = torch.zeros(len(seqs))
    for row in samples:
        counts[index[tuple(row)]] += 1
    expected = p * len(samples)
    big = expected >= 5  # pool the rare cells so the chi-square approximation holds
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    stat = float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum())
    return stat, chi2_critical(int(big.sum()))


def always_accept(sampler, target_logits, drafts, draft_logits, draft_is_greedy):
    """A deliberately wrong rule: accept every draft, then sample from p."""
    k = drafts.shape[1]
    accepted = torch.full((drafts.shape[0],), k)
    return accepted, sampler.choose(target_logits[:, k])


@pytest.mark.parametrize("head_type,temperature,top_k,top_p", [
    ("residual", 1.0, None, None), ("sequential", 0.8, 3, None), ("transformer", 1.2, None, 0.9)])
def test_speculative_sampling_preserves_the_distribution(head_type, temperature, top_k, top_p, monkeypatch):
    model = tiny_model(head_type, n_future=3, seed=11, vocab_size=4, head_std=0.5)
    prompt = torch.tensor([[1, 2, 0]])
    n_tokens, n_samples = 3, 6000
    seqs, p = exact_first_tokens_distribution(model, prompt, n_tokens, Sampler(temperature, top_k, top_p))
    prompts = prompt.expand(n_samples, -1)

    def run(mode):  # every step drafts all heads, so both acceptance branches are exercised
        out = generate(model, prompts, n_tokens, mode=mode, temperature=temperature, top_k=top_k, top_p=top_p, seed=5,
                       cost_model="off")
        return out.tokens, out.stats

    plain, _ = run("ar")
    stat, crit = chi2_against(seqs, p, plain)
    assert stat < crit, f"plain sampling itself is off: chi2={stat:.1f} >= {crit:.1f}"
    spec, stats = run("spec")
    assert stats.acceptance_rates[0] > 0.1 and stats.accepted_histogram[0] > 0  # both branches exercised
    stat, crit = chi2_against(seqs, p, spec)
    assert stat < crit, f"speculative sampling changed the distribution: chi2={stat:.1f} >= {crit:.1f}"
    monkeypatch.setattr(chain, "accept_chain", always_accept)
    wrong, _ = run("spec")
    stat, crit = chi2_against(seqs, p, wrong)
    assert stat > crit, f"the test cannot tell a wrong acceptance rule: chi2={stat:.1f} < {crit:.1f}"


def test_draft_model_sampling_preserves_the_distribution():
    model = tiny_model("residual", n_future=1, seed=12, vocab_size=4)
    drafter = tiny_model("residual", n_future=1, seed=13, vocab_size=4)
    prompt = torch.tensor([[3, 1]])
    seqs, p = exact_first_tokens_distribution(model, prompt, 3, Sampler(1.0))
    out = generate(model, prompt.expand(6000, -1), 3, mode="draft", draft_model=drafter, num_draft=2,
                   temperature=1.0, seed=9)
    stat, crit = chi2_against(seqs, p, out.tokens)
    assert stat < crit


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,needle", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0, temperature=1.0), "top_p"),
    (dict(top_p=1.5, temperature=1.0), "top_p"),
    (dict(mode="spec", num_draft=5), "num_draft"),
    (dict(mode="beam"), "mode"),
    (dict(mode="draft"), "draft_model"),
])
def test_bad_arguments_raise_clear_errors(kwargs, needle):
    model = tiny_model("residual", n_future=3)
    args = dict(max_new_tokens=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=needle):
        generate(model, torch.tensor([[1, 2]]), **args)


def test_prompt_errors():
    model = tiny_model("residual", n_future=3)  # max_seq_len 96
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [torch.tensor([], dtype=torch.long)], 5)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate(model, torch.zeros(1, 90, dtype=torch.long), 10)
    out = generate(model, torch.zeros(1, 90, dtype=torch.long), 10, truncate="left")
    assert len(out.tokens[0]) == 10
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, torch.tensor([[1, 99]]), 5)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, torch.tensor([[1, 2]]), 5, mode="draft", draft_model=tiny_model(vocab_size=50))


# ----------------------------------------------------------------------------- issue 14: bad input


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1.0, top_p=float("nan")), "top_p"),
    (dict(temperature=1.0, top_k=float("inf")), "top_k"),
    (dict(mode="spec", draft_cost=float("nan")), "draft_cost"),
    (dict(mode="spec", draft_cost=float("inf")), "draft_cost"),
])
def test_non_finite_sampling_and_cost_settings_are_refused(kwargs, needle):
    with pytest.raises(MultitokenError, match=needle):
        generate(tiny_model("residual", n_future=3), torch.tensor([[1, 2]]), 5, **kwargs)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="spec", tree="[[0],[0,0"), "tree applies to mode tree, not 'spec'"),
    (dict(mode="ar", tree_budget=4), "tree_budget applies to mode tree"),
    (dict(mode="spec", draft_model="x"), "draft_model applies to mode draft"),
])
def test_an_argument_of_another_mode_is_refused(kwargs, needle):
    with pytest.raises(MultitokenError, match=needle):
        generate(tiny_model("residual", n_future=3), torch.tensor([[1, 2]]), 5, **kwargs)


def test_context_errors_say_what_would_fit():
    model = tiny_model("residual", n_future=3, max_seq_len=64)
    with pytest.raises(MultitokenError) as err:
        generate(model, torch.tensor([[1, 2, 3]]), 100, truncate="left")
    assert "prompt of 3 tokens + max_new_tokens=100 exceeds the model's context of 64 tokens" in str(err.value)
    assert "at most 61 new tokens fit after this prompt" in str(err.value) and "63 new tokens" in str(err.value)
    with pytest.raises(MultitokenError, match="at most 4 new tokens fit after this prompt; truncate='left'"):
        generate(model, torch.zeros(1, 60, dtype=torch.long), 10)


def test_a_draft_model_with_a_shorter_context_is_checked_up_front():
    model = tiny_model("residual", n_future=1, max_seq_len=96)
    drafter = tiny_model("residual", n_future=1, seed=1, max_seq_len=16)
    prompt = torch.tensor([[1, 2, 3]])
    with pytest.raises(MultitokenError, match="exceeds the draft model's context of 16 tokens: at most 13"):
        generate(model, prompt, 40, mode="draft", draft_model=drafter, num_draft=3)
    out = generate(model, prompt, 13, mode="draft", draft_model=drafter, num_draft=3)
    assert out.tokens == generate(model, prompt, 13).tokens
    long = torch.randint(0, 48, (2, 30))  # truncate keeps what fits both contexts
    out = generate(model, long, 6, mode="draft", draft_model=drafter, num_draft=3, truncate="left")
    assert out.tokens == generate(model, long[:, -10:], 6).tokens


@pytest.mark.parametrize("vocab", [2, 5, 11])
def test_the_default_tree_fits_a_small_vocabulary(vocab):
    model = tiny_model("residual", n_future=4, seed=2, vocab_size=vocab)
    prompts = torch.randint(0, vocab, (2, 4), generator=torch.Generator().manual_seed(vocab))
    for tree in (None, "medium", "large"):
        assert generate(model, prompts, 12, mode="tree", tree=tree).tokens == generate(model, prompts, 12).tokens
    with pytest.raises(MultitokenError, match=f"vocabulary has only {vocab} tokens"):  # explicit paths: refused
        generate(model, prompts, 4, mode="tree", tree=[[0], [vocab]])
