"""Per-step trees and path choice: one verify pass with a tree mask, KV compaction of a
chosen path, best-first dynamic trees."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from multitoken.decoding import flatten_tree
from multitoken.decoding.tree_steps import dynamic_tree_paths, path_nodes, static_step_tree
from conftest import HEAD_TYPES, tiny_model

HAND_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


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
