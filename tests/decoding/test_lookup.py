"""Prompt lookup grafted onto the verification tree: the n-gram search, the graft, a scripted
case where only the copied continuation is right, and greedy identity on random tiny models."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from conftest import HEAD_TYPES, RankedStub, tiny_model
from multitoken.decoding import generate
from multitoken.decoding.lookup import LookupHistory, graft_chains, lookup_continuation
from multitoken.decoding.tree_flat import flatten_tree
from multitoken.decoding.tree_steps import root_only_tree, static_step_tree, tree_tokens
from multitoken.errors import MultitokenError


@pytest.mark.parametrize("seq,length,ngrams,expected", [
    ([5, 6, 7, 8, 9, 5, 6], 3, (3, 1), [7, 8, 9]),
    ([5, 6, 7, 1, 6, 2, 5, 6], 2, (3, 1), [7, 1]),  # the 2-gram [5, 6] beats the more recent 1-gram [6]
    ([5, 6, 7, 1, 6, 2, 5, 6], 2, (1, 1), [2, 5]),  # 1-grams only: the most recent earlier 6
    ([1, 2, 3, 4], 5, (3, 1), []),  # nothing repeats
    ([3, 3], 4, (3, 1), [3]),  # the continuation stops at the end of the sequence
    ([2, 2, 2, 2, 2], 3, (3, 1), [2, 2]),  # in a run, the earliest occurrence: the longest continuation
    ([1, 2, 8, 8, 1, 2, 9, 1, 2], 2, (2, 2), [9, 1]),  # the most recent one followed by 2 tokens
    ([1, 2, 1, 2], 0, (3, 1), []),
    ([4, 1, 2, 9, 1, 2], 2, (3, 2), [9, 1]),
])
def test_lookup_continuation_examples(seq, length, ngrams, expected):
    assert lookup_continuation(seq, length, ngrams) == expected


@settings(max_examples=200, deadline=None)
@given(seq=st.lists(st.integers(0, 3), min_size=1, max_size=30), length=st.integers(0, 6),
       longest=st.integers(1, 4), data=st.data())
def test_lookup_continuation_is_the_most_recent_full_match_of_the_longest_ngram(seq, length, longest, data):
    shortest = data.draw(st.integers(1, longest))
    got = lookup_continuation(seq, length, (longest, shortest))
    for n in range(longest, shortest - 1, -1):
        if n >= len(seq):
            continue
        starts = [s for s in range(len(seq) - n) if seq[s:s + n] == seq[-n:]]
        if starts:
            full = [s for s in starts if len(seq) - s - n >= length]
            start = full[-1] if full else starts[0]  # the most recent with a full continuation, else the longest
            assert got == seq[start + n: start + n + length]
            return
    assert got == []


def test_graft_shares_the_tree_nodes_it_matches_and_adds_the_rest():
    tree = static_step_tree(flatten_tree([[0], [1], [0, 0]], 2), 2, "cpu")
    pending = torch.tensor([7, 7])
    candidates = torch.tensor([[[1, 2], [3, 4]], [[1, 2], [3, 4]]])  # (B, k=2, K=2)
    tokens = tree_tokens(tree, pending, candidates)  # nodes: root 7, [0]=1, [1]=2, [0,0]=3
    grafted, block = graft_chains(tree, tokens, [[1, 3, 5, 6], []])
    assert block.shape == (2, 6) and grafted.nodes.tolist() == [6, 4]
    assert block[0].tolist() == [7, 1, 2, 3, 5, 6] and block[1, :4].tolist() == [7, 1, 2, 3]
    assert grafted.parents[0].tolist() == [-1, 0, 0, 1, 3, 4] and grafted.parents[1, 4:].tolist() == [-1, -1]
    assert grafted.depths[0].tolist() == [0, 1, 1, 2, 3, 4]
    assert grafted.mask[0, 5].tolist() == [True, True, False, True, True, True]  # its ancestors and itself
    assert not grafted.mask[1, 4, :4].any()  # padding sees nothing but itself
    again, _ = graft_chains(tree, tokens, [[2], [1, 3]])  # chains wholly inside the tree add nothing
    assert again.width == 4


def test_history_commits_the_pending_token_and_the_accepted_drafts():
    hist = LookupHistory([torch.tensor([1, 2]), torch.tensor([3])])
    hist.commit(torch.tensor([5, 6]), [[7, 8, 9], [4]], [True, True])
    assert hist.rows == [[1, 2, 5, 7, 8], [3, 6]]
    hist.commit(torch.tensor([9, 4]), [[1], [2]], [False, True])
    assert hist.rows == [[1, 2, 5, 7, 8], [3, 6, 4]]
    hist.select(torch.tensor([1]))
    assert hist.rows == [[3, 6, 4]]


SCRIPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 0] * 8


@pytest.mark.parametrize("lookup", [3, 6])
def test_a_copied_continuation_is_accepted_where_the_heads_are_wrong(lookup):
    """The stub's text repeats with period 10 and its heads never rank the true token first, so
    the tree alone accepts nothing; with lookup every step accepts the copied tokens."""
    model = RankedStub(SCRIPT, lambda n, j: 3)
    prompt = torch.tensor([SCRIPT[:12]])
    steps, max_new = 5, 1 + 5 * (lookup + 1)
    alone = generate(model, prompt, max_new, mode="tree", tree=[[0], [1]])
    assert alone.tokens[0] == SCRIPT[12:12 + max_new] and sum(alone.stats.accepted_histogram[1:]) == 0
    out = generate(model, prompt, max_new, mode="tree", tree=[[0], [1]], prompt_lookup=lookup)
    assert out.tokens[0] == SCRIPT[12:12 + max_new]
    assert out.stats.forward_passes == 1 + steps and out.stats.accepted_histogram[lookup] == steps
    assert out.stats.tau == pytest.approx(max_new / (1 + steps))


def _repetitive_prompts(batch, vocab, seed, data):
    """Prompts made of a few repeated random pieces, so lookup finds matches."""
    g = torch.Generator().manual_seed(seed)
    prompts = []
    for _ in range(batch):
        piece = torch.randint(0, vocab, (data.draw(st.integers(1, 4)),), generator=g)
        noise = torch.randint(0, vocab, (data.draw(st.integers(0, 3)),), generator=g)
        prompts.append(torch.cat([piece, noise, piece.repeat(data.draw(st.integers(1, 3)))]))
    return prompts


@settings(max_examples=30, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 100_000), batch=st.sampled_from([1, 3]),
       vocab=st.sampled_from([4, 8]), max_new=st.integers(0, 24), lookup=st.integers(1, 8), data=st.data())
def test_tree_with_lookup_equals_plain_greedy(head_type, seed, batch, vocab, max_new, lookup, data):
    model = tiny_model(head_type, n_future=3, seed=seed, vocab_size=vocab)
    prompts = _repetitive_prompts(batch, vocab, seed, data)
    eos = data.draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    plain = generate(model, prompts, max_new, eos_id=eos).tokens
    tree = data.draw(st.sampled_from(["small", "chain", [[0], [1], [0, 0]]]))
    out = generate(model, prompts, max_new, mode="tree", tree=tree, eos_id=eos, prompt_lookup=lookup)
    assert out.tokens == plain
    budget = data.draw(st.integers(1, 6))
    assert generate(model, prompts, max_new, mode="tree", tree_budget=budget, eos_id=eos,
                    prompt_lookup=lookup).tokens == plain


def test_lookup_runs_past_the_heads_on_a_random_model():
    """Aggregate: on random tiny models with repetitive prompts some steps accept more tokens
    than the heads could draft (the property test above then covers real lookup acceptance)."""
    deep = 0
    for seed in range(6):
        model = tiny_model("residual", n_future=3, seed=seed, vocab_size=4)
        out = generate(model, torch.tensor([[1, 2, 3, 1, 2, 3, 1, 2]]), 40, mode="tree", tree="small",
                       prompt_lookup=6)
        deep += sum(out.stats.accepted_histogram[3:])
    assert deep > 0


@pytest.mark.parametrize("kwargs", [{"mode": "spec", "prompt_lookup": 3}, {"mode": "tree", "prompt_lookup": -1},
                                    {"mode": "tree", "prompt_lookup": 2.5}, {"mode": "tree", "prompt_lookup": True}])
def test_bad_lookup_arguments_are_refused(kwargs):
    with pytest.raises(MultitokenError, match="prompt.lookup"):
        generate(tiny_model("residual", n_future=3), torch.tensor([[1, 2]]), 4, **kwargs)


def test_lookup_is_on_by_default_only_with_a_cost_model():
    from multitoken.decoding.cost import CostModel
    from multitoken.decoding.lookup import DEFAULT_LOOKUP
    flat = CostModel([1], [1, 16], [[1.0, 1.0]])
    model = RankedStub(SCRIPT, lambda n, j: 3)
    prompt = torch.tensor([SCRIPT[:12]])
    on = generate(model, prompt, 30, mode="tree", tree=[[0]], cost_model=flat)
    assert on.stats.prompt_lookup == DEFAULT_LOOKUP and on.stats.lookup_tokens > 0
    assert on.tokens[0] == SCRIPT[12:42]
    off = generate(model, prompt, 30, mode="tree", tree=[[0]], cost_model="off")
    assert off.stats.prompt_lookup == 0 and off.stats.lookup_tokens == 0
    assert generate(model, prompt, 30, mode="tree", tree=[[0]], cost_model=flat, prompt_lookup=0).stats.lookup_tokens == 0


def test_grafting_follows_cost_and_gain():
    """A flat cost always grafts; where each node costs 0.2 of a step, grafting stops once copies
    keep failing (but for a short probe every 4th step), and goes on while they keep paying."""
    from multitoken.decoding.cost import CostModel
    from multitoken.decoding.lookup import LookupDrafter
    rows = [torch.tensor([1, 2, 3, 1, 2, 3, 1, 2])]
    pending = torch.tensor([3])
    flat = LookupDrafter(rows, 5, CostModel([1], [1, 16], [[1.0, 1.0]]))
    assert flat.propose(pending, 8, tree_width=3, tree_depth=2) == [[1, 2, 3, 1, 2]]
    sloped = CostModel([1], [1, 16], [[1.0, 4.0]])
    for gained, expect_on in ((0, False), (5, True)):
        drafter = LookupDrafter(rows, 5, sloped)
        grafted = []
        root = root_only_tree(1, "cpu")
        for _ in range(24):
            tree, _ = drafter.graft(root, pending[:, None], pending, 8)
            chain = drafter.chains[0]
            grafted.append(len(chain))
            assert tree.nodes.tolist() == [1 + len(chain)]  # the chain, grafted below the root
            emitted = chain + [9] if gained else [9]  # the copy held (5 tokens + a bonus), or the target said 9
            drafter.commit([emitted], [gained if chain else 0], [True])
            drafter.history.rows = [rows[0].tolist()]  # the same context every step
        assert grafted[0] == 5  # tried at first
        assert grafted == [5] * 24 if expect_on else grafted[-12:] == [0, 0, 4, 0] * 3  # off: 4-token probes
    assert LookupDrafter(rows, 5, None).propose(pending, 3, 3, 2) == [[1, 2, 3]]  # no costs: always, cut to depth


def test_one_row_of_a_batch_does_not_widen_every_row_for_little_gain():
    """The wider pass is paid by every row: a gain that pays for one row alone does not pay when
    only one of four rows found a continuation."""
    from multitoken.decoding.cost import CostModel
    from multitoken.decoding.lookup import LookupDrafter
    sloped = CostModel([1, 4], [1, 16], [[1.0, 4.0], [1.0, 4.0]])
    alone = LookupDrafter([torch.tensor([1, 2, 1])], 5, sloped)
    assert alone.graft_length(3, 2, rows=1) == 5
    batch = LookupDrafter([torch.tensor([1, 2, 1])] * 4, 5, sloped)
    assert batch.graft_length(3, 2, rows=1) == 0 and batch.graft_length(3, 2, rows=4) == 5
