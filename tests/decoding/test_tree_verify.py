"""Tree-verified decoding: path selection and stats on a scripted stub, greedy exactness
against plain decoding, lossless tree sampling, bad input."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import multitoken.decoding.tree_verify as tree_verify
from multitoken.decoding import Sampler, generate
from conftest import HEAD_TYPES, tiny_model, RankedStub

HAND_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


SCRIPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] * 6


@pytest.mark.parametrize("rank,tree,depth", [
    (lambda n, j: 0, HAND_TREE, 3),                 # the top-1 chain is right: depth 3 every step
    (lambda n, j: 1 if j == 1 else 0, HAND_TREE, 2),  # head 1 right at rank 1 -> path [1, 0]
    (lambda n, j: 1, HAND_TREE, 1),                 # path [1] then [1, 1] is not in the tree
    (lambda n, j: 2, HAND_TREE, 0),                 # nothing right
    (lambda n, j: 1, [[0], [1], [1, 1], [1, 1, 1]], 3),
])
def test_scripted_tree_path_selection_and_stats(rank, tree, depth):
    model = RankedStub(SCRIPT, rank)
    steps = 6
    out = generate(model, torch.tensor([[1, 2]]), 1 + steps * (depth + 1), mode="tree", tree=tree)
    assert out.tokens[0] == SCRIPT[2:3 + steps * (depth + 1)]
    assert out.stats.forward_passes == 1 + steps
    # (with nothing accepted, the last step has room for one token only: a plain, unrecorded step)
    assert out.stats.accepted_histogram[depth] == sum(out.stats.accepted_histogram) == steps - (depth == 0)
    assert out.stats.tau == pytest.approx((1 + steps * (depth + 1)) / (1 + steps))
    width = len(tree) + 1
    assert 1 < out.stats.tree_nodes_per_step <= width


def test_greedy_dynamic_tree_finds_a_rank_two_path():
    model = RankedStub(SCRIPT, lambda n, j: 2 if j == 1 else 0)
    # head probabilities are softmax(-rank): [2, 0, 0] (p = .086 * .63 * .63) is among the best 20 paths
    out = generate(model, torch.tensor([[1, 2]]), 1 + 5 * 4, mode="tree", tree_budget=20)
    assert out.tokens[0] == SCRIPT[2:23]
    assert out.stats.accepted_histogram[3] == 5


def _prompts(batch, vocab, seed, data):
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


@settings(max_examples=30, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 100_000), batch=st.sampled_from([1, 3]),
       vocab=st.sampled_from([5, 8]), max_new=st.integers(0, 20), data=st.data())
def test_tree_greedy_equals_plain_greedy(head_type, seed, batch, vocab, max_new, data):
    model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=vocab)
    prompts = _prompts(batch, vocab, seed, data)
    eos = data.draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    plain = generate(model, prompts, max_new, eos_id=eos).tokens
    tree = data.draw(st.sampled_from(["small", "chain", HAND_TREE, [[0], [1], [2], [1, 0], [1, 1]]]))
    assert generate(model, prompts, max_new, mode="tree", tree=tree, eos_id=eos).tokens == plain
    budget = data.draw(st.integers(1, 12))
    assert generate(model, prompts, max_new, mode="tree", tree_budget=budget, eos_id=eos).tokens == plain


def test_tree_greedy_exercises_acceptance_and_rejection():
    """Aggregate check that the property test's models accept some drafts and reject others."""
    hist_static = torch.zeros(4, dtype=torch.long)
    hist_dynamic = torch.zeros(4, dtype=torch.long)
    for seed in range(3):
        for head_type in HEAD_TYPES:
            model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=8)
            prompts = [torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(seed)) for n in (2, 5, 3)]
            plain = generate(model, prompts, 16).tokens
            out = generate(model, prompts, 16, mode="tree", tree=HAND_TREE, prompt_lookup=0)  # the heads alone
            assert out.tokens == plain
            hist_static += torch.tensor(out.stats.accepted_histogram)
            out = generate(model, prompts, 16, mode="tree", tree_budget=12, prompt_lookup=0)  # > vocab: depth 2
            assert out.tokens == plain
            hist_dynamic += torch.tensor(out.stats.accepted_histogram)
    for hist in (hist_static, hist_dynamic):
        assert hist[0] > 0 and hist[1:].sum() > 0 and hist[2:].sum() > 0


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_chain_tree_is_self_speculative_decoding(head_type):
    model = tiny_model(head_type, n_future=4, seed=7, vocab_size=6)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    spec = generate(model, prompts, 18, mode="spec", cost_model="off")  # every step drafts all heads, as the chain
    chain = generate(model, prompts, 18, mode="tree", tree="chain", prompt_lookup=0)
    assert chain.tokens == spec.tokens
    assert chain.stats.forward_passes == spec.stats.forward_passes
    assert chain.stats.accepted_histogram == spec.stats.accepted_histogram
    assert chain.stats.acceptance_rates == pytest.approx(spec.stats.acceptance_rates)


def test_tree_mode_errors():
    model = tiny_model("residual", n_future=3, vocab_size=8)
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="depth 3, but the model has only 2 draft heads"):
        generate(model, prompt, 5, mode="tree", tree=[[0], [0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="either a static tree or a dynamic tree budget"):
        generate(model, prompt, 5, mode="tree", tree="small", tree_budget=4)
    with pytest.raises(ValueError, match="budget"):
        generate(model, prompt, 5, mode="tree", tree_budget=0)
    with pytest.raises(ValueError, match="vocabulary has only 8"):
        generate(model, prompt, 5, mode="tree", tree=[[0], [8]])
    with pytest.raises(ValueError, match="n_future >= 2"):
        generate(tiny_model("residual", n_future=1), prompt, 5, mode="tree")


def test_num_draft_limits_tree_depth():
    model = tiny_model("residual", n_future=4, seed=1, vocab_size=8)
    prompt = torch.tensor([[1, 2, 3]])
    out = generate(model, prompt, 20, mode="tree", tree=HAND_TREE, num_draft=1, prompt_lookup=0)
    assert out.tokens == generate(model, prompt, 20).tokens
    assert len(out.stats.accepted_histogram) == 2 and out.stats.tree_nodes_per_step <= 3


def _chi2_critical(df: int, z: float = 3.719) -> float:
    """Wilson-Hilferty chi-square quantile; z = 3.719 is a one-sided p-value of 1e-4."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _exact_distribution(model, prompt, n_tokens, sampler):
    """P(first n tokens) under plain sampling, enumerating all V^n continuations."""
    V = model.vocab_size
    seqs = torch.cartesian_prod(*[torch.arange(V)] * n_tokens).reshape(-1, n_tokens)
    with torch.no_grad():
        probs = sampler.probs(model(torch.cat([prompt.expand(len(seqs), -1), seqs], 1))[:, :, 0])
    p = torch.ones(len(seqs))
    for i in range(n_tokens):
        p = p * probs[torch.arange(len(seqs)), prompt.shape[1] - 1 + i, seqs[:, i]]
    return seqs, p


def _chi2(seqs, p, samples):
    """Chi-square statistic of the samples against p (cells with expectation < 5 pooled)."""
    V = int(seqs.max()) + 1
    codes = torch.tensor([sum(t * V ** (len(row) - 1 - i) for i, t in enumerate(row)) for row in samples])
    seq_codes = sum(seqs[:, i] * V ** (seqs.shape[1] - 1 - i) for i in range(seqs.shape[1]))
    counts = torch.zeros(V ** seqs.shape[1]).index_add_(0, codes, torch.ones(len(codes)))[seq_codes]
    expected = p * len(samples)
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    return float(((obs - exp) ** 2 / exp.clamp(min=1e-9)).sum()), _chi2_critical(int(big.sum()))


def accept_first_child(p_child, mass, slot):
    """A deliberately wrong rule: always take the first (top-ranked) child."""
    return torch.ones_like(p_child) if slot == 0 else p_child / mass


@pytest.mark.parametrize("head_type,temperature,top_k,top_p,tree,budget,lookup", [
    ("residual", 1.0, None, None, [[0], [1], [2], [0, 0], [0, 1], [1, 0]], None, 0),
    ("sequential", 0.8, 3, None, None, 5, 0),
    ("transformer", 1.2, None, 0.9, [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0]], None, 0),
    ("residual", 1.0, None, None, [[0], [1], [0, 0]], None, 3),  # prompt-lookup nodes grafted on
])
def test_tree_sampling_preserves_the_distribution(head_type, temperature, top_k, top_p, tree, budget, lookup,
                                                   monkeypatch):
    """Empirical first-3-token distribution over 6000 independent rows vs the exact one
    (chi-square, p = 1e-4); the same test rejects a wrong rule. Rows generate 5 tokens so
    that the first tree step may accept a depth-2 path (tokens 2 and 3) plus a bonus."""
    model = tiny_model(head_type, n_future=3, seed=11, vocab_size=4, head_std=0.5)
    prompt = torch.tensor([[1, 2, 0, 1, 2, 0, 1, 2] if lookup else [1, 2, 0]])  # lookup: repeats to copy
    n_tokens, n_rows = 3, 6000
    seqs, p = _exact_distribution(model, prompt, n_tokens, Sampler(temperature, top_k, top_p))

    def run():
        out = generate(model, prompt.expand(n_rows, -1), n_tokens + 2, mode="tree", tree=tree, tree_budget=budget,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=5, prompt_lookup=lookup,
                       cost_model="off")  # lookup chains of full length every step
        return [t[:n_tokens] for t in out.tokens], out.stats

    samples, stats = run()
    hist = stats.accepted_histogram
    assert hist[0] > 0 and hist[1] > 0 and hist[2] > 0  # rejections, partial and full acceptance all happen
    assert not lookup or sum(hist[3:]) > 0  # steps that accepted past the heads' depth: lookup nodes
    stat, crit = _chi2(seqs, p, samples)
    assert stat < crit, f"tree sampling changed the distribution: chi2={stat:.1f} >= {crit:.1f}"
    monkeypatch.setattr(tree_verify, "lossless_child_rule", accept_first_child)
    stat, crit = _chi2(seqs, p, run()[0])
    assert stat > crit, f"the test cannot tell a wrong rule: chi2={stat:.1f} <= {crit:.1f}"


def test_tree_sampling_is_reproducible_with_a_seed():
    model = tiny_model("residual", n_future=3, seed=2, vocab_size=8)
    prompts = [torch.tensor([1, 2]), torch.tensor([3])]
    a = generate(model, prompts, 15, mode="tree", tree="small", temperature=1.0, seed=3)
    b = generate(model, prompts, 15, mode="tree", tree="small", temperature=1.0, seed=3)
    assert a.tokens == b.tokens and all(len(t) == 15 for t in a.tokens)
