"""The step loop: finished rows leave the batch (models with ``select_rows``) and every row
still equals its own plain decoding; models without ``select_rows`` keep finished rows."""
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings, strategies as st

from multitoken.decoding import generate
from conftest import HEAD_TYPES, tiny_model


class RowStub:
    """Per-row scripted model: row b's base head emits scripts[b][pos + 1] at position pos;
    head j at committed length L puts the true token scripts[b][L + j] at rank ``rank(b, L, j)``
    of its logits (rank 1: the draft is wrong). ``batches`` records every verify pass's batch size.
    Rows are identified by ``state.rows`` (original row ids), which ``select_rows`` keeps in step."""

    vocab_size, n_future, max_seq_len = 10, 4, 1000

    def __init__(self, scripts, rank=lambda b, length, j: 0):
        self.scripts, self.rank, self.batches = torch.tensor(scripts), rank, []

    def new_state(self, batch, capacity):
        return SimpleNamespace(lengths=torch.zeros(batch, dtype=torch.long), capacity=capacity,
                               rows=torch.arange(batch))

    def verify(self, state, tokens, tree_mask=None, depths=None):
        self.batches.append(tokens.shape[0])
        depths = torch.arange(tokens.shape[1]) if depths is None else depths
        pos = state.lengths[:, None] + depths
        nxt = self.scripts[state.rows[:, None].expand_as(pos), pos + 1]
        return torch.nn.functional.one_hot(nxt, self.vocab_size).float() * 20

    def accept(self, state, keep, counts):
        state.lengths = state.lengths + counts

    def crop(self, state, lengths):
        state.lengths = lengths.clone()

    def draft(self, state, next_tokens, k, pick):
        logits = torch.empty(len(state.rows), k, self.vocab_size)
        for i, (b, length) in enumerate(zip(state.rows.tolist(), state.lengths.tolist())):
            for j in range(1, k + 1):
                true = int(self.scripts[b, length + j])
                order = [t for t in range(self.vocab_size) if t != true]
                order.insert(self.rank(b, length, j), true)
                logits[i, j - 1, torch.tensor(order)] = -torch.arange(self.vocab_size, dtype=torch.float)
        return torch.stack([pick(logits[:, j], j) for j in range(k)], 1), logits


class SelectingRowStub(RowStub):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.selected = []

    def select_rows(self, state, index):
        self.selected.append(index.tolist())
        return SimpleNamespace(lengths=state.lengths[index], capacity=state.capacity, rows=state.rows[index])


SCRIPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9] * 8, [9, 8, 7, 6, 5, 4, 3, 2, 1] * 8, [2, 4, 6, 8, 1, 3, 5, 7, 9] * 8]
PROMPTS = [torch.tensor([1, 2]), torch.tensor([9, 8]), torch.tensor([2, 4])]


def scripted(b, max_new, eos=None, start=2):
    out = SCRIPTS[b][start: start + max_new]
    return out[: out.index(eos) + 1] if eos is not None and eos in out else out


@pytest.mark.parametrize("stub", [RowStub, SelectingRowStub])
@pytest.mark.parametrize("mode", ["spec", "tree"])
def test_one_row_accepts_every_draft_while_another_accepts_none(stub, mode):
    model = stub(SCRIPTS, rank=lambda b, length, j: 0 if b == 0 else 1)  # row 0 always right, row 1 always wrong
    out = generate(model, PROMPTS[:2], 13, mode=mode, tree="chain" if mode == "tree" else None)
    assert out.tokens == [scripted(0, 13), scripted(1, 13)]
    # Row 0 emits 4 tokens per pass and is done after 3 steps; row 1 one per pass (12 steps).
    assert out.stats.forward_passes == 1 + 12
    if stub is SelectingRowStub:
        assert model.selected == [[1]] and model.batches[:4] == [2, 2, 2, 2] and set(model.batches[4:]) == {1}
    else:
        assert set(model.batches) == {2}


@pytest.mark.parametrize("stub", [RowStub, SelectingRowStub])
def test_a_row_ending_on_eos_mid_block_while_others_continue(stub):
    model = stub(SCRIPTS)  # every draft right: blocks of 4 tokens
    # EOS 4: rows 0 and 1 reach it at their 2nd and 4th new token, inside the first verified
    # block (prefill emits 1, each block 4); row 2 only at its 9th, at the end of the second block.
    out = generate(model, PROMPTS, 20, mode="spec", eos_id=4)
    assert out.tokens == [scripted(b, 20, eos=4) for b in range(3)]
    assert [len(t) for t in out.tokens] == [2, 4, 9]
    if stub is SelectingRowStub:
        assert model.selected == [[2]] and model.batches == [3, 3, 1]
    else:
        assert model.batches == [3, 3, 3]


def test_rows_reach_max_new_tokens_at_different_steps_and_leave_the_batch():
    # Row 0 accepts all drafts, row 1 only the first, row 2 none: they finish at different steps.
    model = SelectingRowStub(SCRIPTS, rank=lambda b, length, j: 0 if j <= 2 - b else 1)
    out = generate(model, PROMPTS, 11, mode="spec")
    assert out.tokens == [scripted(b, 11) for b in range(3)]
    assert model.selected[0] == [1, 2] and model.selected[-1] == [1]  # row 0 leaves first, then row 1
    assert model.batches == sorted(model.batches, reverse=True) and model.batches[-1] == 1


def test_rows_done_after_prefill_never_enter_a_step():
    model = SelectingRowStub(SCRIPTS)
    out = generate(model, PROMPTS, 6, mode="spec", eos_id=7)  # row 1's first token is EOS
    assert out.tokens == [scripted(b, 6, eos=7) for b in range(3)] and out.tokens[1] == [7]
    assert model.selected[0] == [0, 2] and model.batches[1] == 2


class WithoutSelect:
    """The same model with ``select_rows`` hidden: finished rows stay in the batch."""

    def __init__(self, model):
        self.model = model
        for name in ("vocab_size", "n_future", "max_seq_len", "new_state", "verify", "accept", "crop", "draft",
                     "parameters"):
            setattr(self, name, getattr(model, name))


@settings(max_examples=30, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 100_000), vocab=st.sampled_from([5, 8, 48]),
       mode=st.sampled_from(["ar", "spec", "tree"]), max_new=st.integers(1, 20), data=st.data())
def test_dropping_finished_rows_keeps_every_row_exact(head_type, seed, vocab, mode, max_new, data):
    model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=vocab)
    g = torch.Generator().manual_seed(seed)
    lengths = data.draw(st.lists(st.integers(1, 9), min_size=2, max_size=5))
    prompts = [torch.randint(0, vocab, (n,), generator=g) for n in lengths]
    eos = data.draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    kwargs = data.draw(st.sampled_from([{}, {"tree_budget": 5}])) if mode == "tree" else {}
    plain = [generate(model, [p], max_new, eos_id=eos).tokens[0] for p in prompts]  # one row at a time
    # Fixed draft lengths: with costs, a smaller batch may rightly choose other lengths.
    dropped = generate(model, prompts, max_new, mode=mode, eos_id=eos, cost_model="off", **kwargs)
    kept = generate(WithoutSelect(model), prompts, max_new, mode=mode, eos_id=eos, cost_model="off", **kwargs)
    assert dropped.tokens == plain and kept.tokens == plain
    assert dropped.stats.forward_passes == kept.stats.forward_passes


def test_finished_rows_stop_costing_compute():
    model = tiny_model("residual", n_future=3, seed=1)
    calls = []
    verify = model.verify
    model.verify = lambda state, tokens, *a: calls.append(tokens.shape[0]) or verify(state, tokens, *a)
    eos = generate(model, [torch.tensor([1, 2, 3])], 1).tokens[0][0]  # four rows stop at their first token
    other = next(p for p in ([7, 8], [9], [4, 4, 4], [30, 31])
                 if generate(model, [torch.tensor(p)], 1).tokens[0][0] != eos)
    calls.clear()
    out = generate(model, [torch.tensor([1, 2, 3])] * 4 + [torch.tensor(other)], 20, mode="spec", eos_id=eos,
                   cost_model="off")  # no calibration passes among the calls
    assert out.tokens[:4] == [[eos]] * 4 and len(out.tokens[4]) > 1
    assert calls[0] == 5 and set(calls[1:]) == {1}  # prefill for all, then the one row still going


@pytest.mark.parametrize("mode", ["ar", "spec", "tree", "draft"])
def test_sampling_runs_in_batches_with_rows_leaving(mode):
    model = tiny_model("sequential", n_future=3, seed=2, vocab_size=8)
    prompts = [torch.tensor([1, 2]), torch.tensor([3]), torch.tensor([4, 5, 6]), torch.tensor([7])]
    kwargs = {"draft_model": tiny_model("residual", n_future=1, seed=3, vocab_size=8)} if mode == "draft" else {}
    out = generate(model, prompts, 12, mode=mode, temperature=0.9, top_p=0.95, seed=4, eos_id=0, **kwargs)
    for tokens in out.tokens:
        assert 1 <= len(tokens) <= 12 and (0 not in tokens[:-1]) and (tokens[-1] == 0 or len(tokens) == 12)
    again = generate(model, prompts, 12, mode=mode, temperature=0.9, top_p=0.95, seed=4, eos_id=0, **kwargs)
    assert again.tokens == out.tokens  # a seed still reproduces the batch
