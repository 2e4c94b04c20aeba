"""Tree verification: representation, one-pass verify with a tree mask, KV compaction,
greedy exactness against plain decoding, lossless tree sampling, the tree tuner."""
import json
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import multitoken.decoding.tree as tree_mod
from multitoken.decoding.generate import generate
from multitoken.decoding.sampling import Sampler
from multitoken.decoding.tree import (
    build_tree, dynamic_tree_paths, expected_accept_length, flatten_tree, load_tree, measure_topk_acceptance,
    parse_tree, path_nodes, resolve_tree, save_tree, static_step_tree, tree_preset, tune_tree, validate_tree,
    verify_cost_by_width,
)
from conftest import HEAD_TYPES, tiny_model, RankedStub

HAND_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]

# ----------------------------------------------------------------------------- representation


def test_flatten_hand_built_tree():
    t = flatten_tree(HAND_TREE)
    # node 0 = root (pending token); then depth 1: [0] [1]; depth 2: [0,0] [0,1] [1,0]; depth 3: [0,0,0]
    assert [list(p) for p in t.paths] == HAND_TREE
    assert t.width == 7 and t.max_depth == 3 and t.top_k == 2
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.heads.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.ranks.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.mask, expected)
    # unordered input gives the same flattening
    assert torch.equal(flatten_tree(list(reversed(HAND_TREE))).mask, expected)
    cut = t.truncated(1)
    assert [list(p) for p in cut.paths] == [[0], [1]] and cut.width == 3


@pytest.mark.parametrize("paths,num_heads,needle", [
    ([[0], [0, 0], [1, 1]], None, r"\[1, 1\] has no parent: add \[1\]"),
    ([[0], [0, 0], [0, 0, 0]], 2, "depth 3, but the model has only 2 draft heads"),
    ([[0], [0]], None, "appears twice"),
    ([[0], []], None, "empty tree path"),
    ([[0], [-1]], None, "non-negative integers"),
    ([[0], [0.5]], None, "non-negative integers"),
    ([], None, "at least one path"),
    ("[[0]]", None, "list of paths"),
    ([0, 1], None, "not a list of top-k ranks"),
])
def test_validation_errors_are_clear(paths, num_heads, needle):
    with pytest.raises(ValueError, match=needle):
        validate_tree(paths, num_heads)


def test_presets_are_valid_trees_of_their_size():
    for heads in (1, 2, 3, 4):
        for name, size in tree_mod.TREE_PRESETS.items():
            paths = tree_preset(name, heads)
            validate_tree(paths, heads)
            assert len(paths) == (heads if size is None else size)
    assert tree_preset("small", 3) == [[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="unknown tree preset"):
        tree_preset("huge", 3)


def test_parse_tree_forms(tmp_path):
    assert parse_tree("small", 3) == tree_preset("small", 3)
    assert parse_tree("[[0],[1],[0,0]]", 3) == [[0], [1], [0, 0]]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_tree("[[0],", 3)
    with pytest.raises(ValueError, match="unknown tree"):
        parse_tree("nope", 3)
    save_tree([[1], [0], [0, 0]], tmp_path)
    assert parse_tree(str(tmp_path), 3) == [[0], [1], [0, 0]]


# ----------------------------------------------------------------------------- one verify pass


def _node_tokens(t, seed, vocab):
    return torch.randint(0, vocab, (t.width,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head_type", ["residual", "transformer"])
def test_tree_verify_matches_teacher_forcing_at_every_node(head_type):
    """Each node's logits = a full forward over prefix + its root-to-node path: checks the
    mask (ancestors only) and the positions (prefix length + depth) of every node, per row."""
    model = tiny_model(head_type, n_future=4, seed=3)
    t = flatten_tree(HAND_TREE)
    prefixes = [torch.randint(0, 48, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 9)]
    block = torch.stack([_node_tokens(t, 1, 48), _node_tokens(t, 2, 48)])  # (2, W)
    state = model.new_state(2, 32)
    lengths = torch.tensor([len(p) for p in prefixes])
    padded = torch.zeros(2, 9, dtype=torch.long)
    for b, p in enumerate(prefixes):
        padded[b, : len(p)] = p
    model.verify(state, padded)
    model.accept(state, None, lengths)
    logits = model.verify(state, block, t.mask, t.depths)
    for b, prefix in enumerate(prefixes):
        for node in range(t.width):
            path = t.mask[node].nonzero().squeeze(1)
            seq = torch.cat([prefix, block[b, path]])[None]
            with torch.no_grad():
                full = model(seq)[0, -1, 0]
            torch.testing.assert_close(logits[b, node], full, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_accepting_a_non_prefix_path_compacts_the_cache(head_type):
    """Keep path [1, 0] (nodes 0, 2, 5): later verify and draft logits equal teacher forcing."""
    model = tiny_model(head_type, n_future=4, seed=4)
    t = flatten_tree(HAND_TREE)
    seq = torch.randint(0, 48, (1, 24), generator=torch.Generator().manual_seed(9))
    block = _node_tokens(t, 5, 48)[None]
    block[0, 0], block[0, 2], block[0, 5] = seq[0, 6], seq[0, 7], seq[0, 8]  # the kept path is the true sequence
    state = model.new_state(1, 40)
    model.verify(state, seq[:, :6])
    model.accept(state, None, torch.tensor([6]))
    model.draft(state, seq[:, 6], 3, lambda lg, j: lg.argmax(-1))  # as tree_decode does before verify
    model.verify(state, block, t.mask, t.depths)
    step = static_step_tree(t, 1, "cpu")
    keep, counts = path_nodes(step, torch.tensor([5]))
    assert keep.tolist() == [[0, 2, 5]] and counts.tolist() == [3]
    model.accept(state, keep, counts)
    assert state.lengths.tolist() == [9]
    with torch.no_grad():
        full = model(seq)
    _, dl = model.draft(state, seq[:, 9], 3, lambda lg, j: seq[:, 10 + j])
    for j in range(3):
        torch.testing.assert_close(dl[:, j], full[:, 8, j + 1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.verify(state, seq[:, 9:13]), full[:, 9:13, 0], atol=2e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- building trees


def _brute_force_top(probs, budget):
    """All paths with their cumulative probabilities; the top ``budget`` scores."""
    depth, top = len(probs), len(probs[0])
    scores = {}
    frontier = [((), 1.0)]
    for d in range(depth):
        nxt = []
        for path, s in frontier:
            for r in range(top):
                scores[path + (r,)] = s * probs[d][r]
                nxt.append((path + (r,), s * probs[d][r]))
        frontier = nxt
    return sorted(scores.values(), reverse=True)[:budget], scores


@settings(max_examples=60, deadline=None)
@given(depth=st.integers(1, 4), top=st.integers(1, 5), budget=st.integers(1, 20), data=st.data())
def test_dynamic_tree_is_the_best_first_top_budget(depth, top, budget, data):
    probs = [sorted(data.draw(st.lists(st.floats(0.001, 1.0), min_size=top, max_size=top)), reverse=True)
             for _ in range(depth)]
    paths = dynamic_tree_paths(probs, budget)
    best, scores = _brute_force_top(probs, budget)
    got = sorted((scores[tuple(p)] for p in paths), reverse=True)
    assert len(paths) == min(budget, len(scores))
    assert got == pytest.approx(best, rel=1e-12)
    seen = set()
    for p in paths:  # topological order: parents first
        assert len(p) == 1 or tuple(p[:-1]) in seen
        seen.add(tuple(p))


def test_build_tree_follows_expected_contribution():
    acc = [[0.6, 0.2, 0.05], [0.5, 0.1, 0.0], [0.4, 0.0, 0.0]]
    # contributions: [0]=.6 [0,0]=.3 [1]=.2 [0,0,0]=.12 [1,0]=.1 [0,1]=.06 [2]=.05 ...
    assert build_tree(acc, 4) == [[0], [1], [0, 0], [0, 0, 0]]
    assert build_tree(acc, 6) == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert expected_accept_length([[0], [1], [0, 0]], acc) == pytest.approx(1 + 0.6 + 0.2 + 0.3)
    assert len(build_tree(acc, 1000)) < 1000  # zero-probability nodes are never added
    with pytest.raises(ValueError, match="budget"):
        build_tree(acc, 0)


# ----------------------------------------------------------------------------- a scripted stub (conftest.RankedStub)


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


# ----------------------------------------------------------------------------- exactness


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
            out = generate(model, prompts, 16, mode="tree", tree=HAND_TREE)
            assert out.tokens == plain
            hist_static += torch.tensor(out.stats.accepted_histogram)
            out = generate(model, prompts, 16, mode="tree", tree_budget=12)  # > vocab: forces depth 2
            assert out.tokens == plain
            hist_dynamic += torch.tensor(out.stats.accepted_histogram)
    for hist in (hist_static, hist_dynamic):
        assert hist[0] > 0 and hist[1:].sum() > 0 and hist[2:].sum() > 0


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_chain_tree_is_self_speculative_decoding(head_type):
    model = tiny_model(head_type, n_future=4, seed=7, vocab_size=6)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4])]
    spec = generate(model, prompts, 18, mode="spec")
    chain = generate(model, prompts, 18, mode="tree", tree="chain")
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
    out = generate(model, prompt, 20, mode="tree", tree=HAND_TREE, num_draft=1)
    assert out.tokens == generate(model, prompt, 20).tokens
    assert len(out.stats.accepted_histogram) == 2 and out.stats.tree_nodes_per_step <= 3


# ----------------------------------------------------------------------------- lossless sampling


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


@pytest.mark.parametrize("head_type,temperature,top_k,top_p,tree,budget", [
    ("residual", 1.0, None, None, [[0], [1], [2], [0, 0], [0, 1], [1, 0]], None),
    ("sequential", 0.8, 3, None, None, 5),
    ("transformer", 1.2, None, 0.9, [[0], [1], [2], [0, 0], [0, 1], [1, 0], [2, 0]], None),
])
def test_tree_sampling_preserves_the_distribution(head_type, temperature, top_k, top_p, tree, budget,
                                                   monkeypatch):
    """Empirical first-3-token distribution over 6000 independent rows vs the exact one
    (chi-square, p = 1e-4); the same test rejects a wrong rule. Rows generate 5 tokens so
    that the first tree step may accept a depth-2 path (tokens 2 and 3) plus a bonus."""
    model = tiny_model(head_type, n_future=3, seed=11, vocab_size=4, head_std=0.5)
    prompt = torch.tensor([[1, 2, 0]])
    n_tokens, n_rows = 3, 6000
    seqs, p = _exact_distribution(model, prompt, n_tokens, Sampler(temperature, top_k, top_p))

    def run():
        out = generate(model, prompt.expand(n_rows, -1), n_tokens + 2, mode="tree", tree=tree, tree_budget=budget,
                       temperature=temperature, top_k=top_k, top_p=top_p, seed=5)
        return [t[:n_tokens] for t in out.tokens], out.stats

    samples, stats = run()
    hist = stats.accepted_histogram
    assert hist[0] > 0 and hist[1] > 0 and hist[2] > 0  # rejections, partial and full acceptance all happen
    stat, crit = _chi2(seqs, p, samples)
    assert stat < crit, f"tree sampling changed the distribution: chi2={stat:.1f} >= {crit:.1f}"
    monkeypatch.setattr(tree_mod, "lossless_child_rule", accept_first_child)
    stat, crit = _chi2(seqs, p, run()[0])
    assert stat > crit, f"the test cannot tell a wrong rule: chi2={stat:.1f} <= {crit:.1f}"


def test_tree_sampling_is_reproducible_with_a_seed():
    model = tiny_model("residual", n_future=3, seed=2, vocab_size=8)
    prompts = [torch.tensor([1, 2]), torch.tensor([3])]
    a = generate(model, prompts, 15, mode="tree", tree="small", temperature=1.0, seed=3)
    b = generate(model, prompts, 15, mode="tree", tree="small", temperature=1.0, seed=3)
    assert a.tokens == b.tokens and all(len(t) == 15 for t in a.tokens)


# ----------------------------------------------------------------------------- tuner, files, cost


def test_measured_acceptance_matches_teacher_forced_heads():
    model = tiny_model("residual", n_future=4, seed=5, vocab_size=8)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    n = 12
    acc = measure_topk_acceptance(model, [prompt], num_draft=3, top_k=4, max_new_tokens=n)
    assert acc.shape == (3, 4) and bool(((acc >= 0) & (acc <= 1)).all()) and bool((acc.sum(1) <= 1 + 1e-9).all())
    gen = generate(model, prompt[None], n).tokens[0]
    with torch.no_grad():
        full = model(torch.cat([prompt, torch.tensor(gen)])[None])[0]  # (T, n_future, V)
    P = len(prompt)
    for j in range(1, 4):
        hits, total = torch.zeros(4), 0
        for s in range(n - 1):
            if s + j < n:
                cand = full[P - 1 + s, j].topk(4).indices
                hits += (cand == gen[s + j]).float()
                total += 1
        torch.testing.assert_close(acc[j - 1].float(), hits / total)


def test_tune_save_load_and_default(tmp_path):
    model = tiny_model("residual", n_future=4, seed=6, vocab_size=8)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    paths = tune_tree(model, prompts, budget=6, max_new_tokens=10)
    assert 1 <= len(paths) <= 6
    validate_tree(paths, 3)
    assert load_tree(tmp_path) is None
    assert resolve_tree(None, tmp_path, 3) == tree_preset(tree_mod.DEFAULT_PRESET, 3)
    acc = measure_topk_acceptance(model, prompts, top_k=6, max_new_tokens=10)
    torch.testing.assert_close(acc, measure_topk_acceptance(model, prompts, top_k=6, max_new_tokens=10, batch_size=1))
    f = save_tree(paths, tmp_path, acceptance=acc, budget=6)
    record = json.loads(f.read_text())
    assert record["paths"] == paths and record["budget"] == 6 and record["expected_tau"] >= 1
    assert load_tree(tmp_path) == paths and resolve_tree(None, tmp_path, 3) == paths
    assert resolve_tree("chain", tmp_path, 3) == [[0], [0, 0], [0, 0, 0]]  # an explicit tree wins
    out = generate(model, [prompts[0]], 12, mode="tree", tree=str(tmp_path))
    assert out.tokens == generate(model, [prompts[0]], 12).tokens
    f.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt tree file"):
        load_tree(tmp_path)
    f.write_text(json.dumps({"paths": [[0, 0]]}))
    with pytest.raises(ValueError, match="corrupt tree file.*no parent"):
        load_tree(tmp_path)


def test_verify_cost_by_width_rows():
    model = tiny_model("transformer", n_future=4, seed=0)
    rows = verify_cost_by_width(model, [1, 4, 16], prefix_len=20, repeats=2)
    assert [r["width"] for r in rows] == [1, 4, 16]
    assert all(r["seconds"] > 0 and r["min_seconds"] <= r["seconds"] for r in rows)
    assert rows[0]["relative"] == 1.0
    with pytest.raises(ValueError, match="prefix_len"):
        verify_cost_by_width(model, [4], prefix_len=200)
