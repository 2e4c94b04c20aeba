"""The native model's decode-time protocol reproduces teacher-forced logits exactly.

verify() over a cached prefix must give the base logits of a full forward, and draft()
must give each head's logits at the last committed position, including after partial
acceptance that differs per row and after tree-path (non-prefix) commits.
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import HEAD_TYPES, tiny_model


def run_protocol(model, seq, prompt_len, blocks):
    """Drive prefill + (draft, verify, accept) with teacher-forced picks; compare to model(seq)."""
    B = seq.shape[0]
    with torch.no_grad():
        full = model(seq)  # (B, T, n, V)
    k = model.n_future - 1
    state = model.new_state(B, seq.shape[1] + 2 * model.n_future)
    logits = model.verify(state, seq[:, :prompt_len])
    torch.testing.assert_close(logits, full[:, :prompt_len, 0], atol=2e-5, rtol=1e-4)
    model.accept(state, None, torch.full((B,), prompt_len))
    length = torch.full((B,), prompt_len)
    for width, accepted in blocks:
        rows = torch.arange(B)
        toks, draft_logits = model.draft(state, seq[rows, length], k,
                                         lambda lg, j: seq[rows, (length + 1 + j).clamp(max=seq.shape[1] - 1)])
        for j in range(k):
            torch.testing.assert_close(draft_logits[:, j], full[rows, length - 1, j + 1], atol=2e-5, rtol=1e-4)
        idx = (length[:, None] + torch.arange(width)).clamp(max=seq.shape[1] - 1)
        logits = model.verify(state, seq.gather(1, idx))
        torch.testing.assert_close(logits, full[rows[:, None], idx, 0], atol=2e-5, rtol=1e-4)
        counts = torch.as_tensor(accepted)
        model.accept(state, None, counts)
        length = length + counts
    return state


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_verify_and_draft_match_teacher_forcing_with_per_row_acceptance(head_type):
    model = tiny_model(head_type, n_future=4, seed=1)
    seq = torch.randint(0, 48, (3, 40))
    run_protocol(model, seq, prompt_len=5, blocks=[(4, [1, 4, 2]), (4, [3, 1, 4]), (2, [2, 2, 1]), (4, [4, 3, 1])])


@settings(max_examples=25, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 10_000), prompt_len=st.integers(1, 8),
       accepts=st.lists(st.integers(1, 4), min_size=1, max_size=6))
def test_protocol_property(head_type, seed, prompt_len, accepts):
    model = tiny_model(head_type, n_future=4, seed=seed)
    seq = torch.randint(0, 48, (1, 60), generator=torch.Generator().manual_seed(seed))
    run_protocol(model, seq, prompt_len, [(4, [a]) for a in accepts])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_tree_path_commit_compacts_the_cache(head_type):
    """Verify a 2-branch tree, keep one branch; the cache then equals a plain prefix."""
    model = tiny_model(head_type, n_future=3, seed=2)
    seq = torch.randint(0, 48, (1, 20))
    wrong = (seq + 1) % 48
    state = model.new_state(1, 32)
    model.verify(state, seq[:, :6])
    model.accept(state, None, torch.tensor([6]))
    # Block: root=seq[6]; node1 = wrong[7] (child of root); node2 = seq[7] (child of root); node3 = seq[8] (child of 2)
    block = torch.stack([seq[0, 6], wrong[0, 7], seq[0, 7], seq[0, 8]])[None]
    tree_mask = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    depths = torch.tensor([0, 1, 1, 2])
    logits = model.verify(state, block, tree_mask, depths)
    with torch.no_grad():
        full = model(seq)
    torch.testing.assert_close(logits[:, [0, 2, 3]], full[:, 6:9, 0], atol=2e-5, rtol=1e-4)
    model.accept(state, torch.tensor([[0, 2, 3]]), torch.tensor([3]))
    assert state.lengths.tolist() == [9]
    toks, dl = model.draft(state, seq[:, 9], 2, lambda lg, j: seq[:, 10 + j])
    torch.testing.assert_close(dl[:, 0], full[:, 8, 1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(dl[:, 1], full[:, 8, 2], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(model.verify(state, seq[:, 9:12]), full[:, 9:12, 0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_select_rows_keeps_the_chosen_rows_exact(head_type):
    """After per-row acceptance, keep rows [2, 0]: their verify and draft still match teacher forcing."""
    model = tiny_model(head_type, n_future=4, seed=3)
    seq = torch.randint(0, 48, (3, 40), generator=torch.Generator().manual_seed(3))
    state = run_protocol(model, seq, prompt_len=5, blocks=[(4, [1, 4, 2]), (4, [3, 2, 4])])
    index = torch.tensor([2, 0])
    picked = model.select_rows(state, index)
    assert picked.lengths.tolist() == [11, 9] and state.lengths.tolist() == [9, 11, 11]  # the old state is intact
    sub, length = seq[index], picked.lengths.clone()
    with torch.no_grad():
        full = model(sub)
    rows = torch.arange(2)
    for width, accepted in [(4, [2, 4]), (3, [3, 1])]:
        _, draft_logits = model.draft(picked, sub[rows, length], 3, lambda lg, j: sub[rows, length + 1 + j])
        torch.testing.assert_close(draft_logits, full[rows, length - 1, 1:], atol=2e-5, rtol=1e-4)
        idx = length[:, None] + torch.arange(width)
        torch.testing.assert_close(model.verify(picked, sub.gather(1, idx)), full[rows[:, None], idx, 0],
                                   atol=2e-5, rtol=1e-4)
        model.accept(picked, None, torch.tensor(accepted))
        length = length + torch.tensor(accepted)


def test_select_rows_refuses_a_bad_index():
    model = tiny_model("residual", n_future=2)
    state = model.new_state(2, 8)
    for bad in (torch.tensor([2]), torch.tensor([0, 0]), torch.tensor([[0]])):
        with pytest.raises((IndexError, TypeError)):
            model.select_rows(state, bad)


def test_decode_hints_are_optional():
    from multitoken.model.protocol import HINTS, decode_hint
    model = tiny_model("residual", n_future=3, seed=0)
    assert all(decode_hint(model, name) is None for name in HINTS)  # the native model offers none
    model.draft_tree = [[0], [0, 0]]
    assert decode_hint(model, "draft_tree") == [[0], [0, 0]]
    with pytest.raises(KeyError, match="unknown decode hint"):
        decode_hint(model, "draft_speed")
