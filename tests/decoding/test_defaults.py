"""The cost-aware defaults: draft length and tree picked from scripted costs and acceptance,
and output identical to plain decoding whatever they pick."""
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HEAD_TYPES, RankedStub, tiny_model
from multitoken.decoding import CostModel, DraftLengthPolicy, cost_aware_tree, default_tree, generate
from multitoken.errors import MultitokenError

WIDTHS = list(range(1, 17))
# A verify pass is flat up to 4 tokens, then each further token costs half a step.
FLAT_TO_4 = CostModel([1], WIDTHS, [[1.0 if w <= 4 else 1.0 + 0.5 * (w - 4) for w in WIDTHS]], [[0.0] * 8])
ACC = torch.tensor([[0.9, 0.3, 0.1, 0.05], [0.8, 0.2, 0.05, 0.02], [0.7, 0.1, 0.03, 0.01], [0.6, 0.1, 0.02, 0.01]])
SCRIPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 4


class HintedStub(RankedStub):
    """RankedStub (every head's top-1 right) offering a top-k acceptance table and maybe a saved tree."""

    n_future = 5

    def __init__(self, acceptance=ACC, tree=None):
        super().__init__(SCRIPT)
        self.draft_acceptance, self.draft_tree = acceptance, tree


def test_the_tree_fits_the_flat_part_of_the_verify_cost():
    paths, rows = cost_aware_tree(ACC, lambda width, depth: FLAT_TO_4.step_cost(depth, 1, width))
    assert len(paths) == 3  # width 4: every further node costs more than it adds
    assert [r["nodes"] for r in rows] == list(range(1, 16)) and max(rows, key=lambda r: r["score"])["nodes"] == 3
    free = CostModel([1], WIDTHS, [[1.0] * 16])
    assert len(cost_aware_tree(ACC, lambda width, depth: free.step_cost(depth, 1, width))[0]) == 15


def test_generate_picks_the_cost_aware_tree_and_reports_it():
    stub = HintedStub()
    out = generate(stub, torch.tensor([[1, 2]]), 13, mode="tree", cost_model=FLAT_TO_4)
    assert out.tokens[0] == SCRIPT[2:15] and out.stats.tree_nodes == 3 and out.stats.chosen_by == "cost-aware"
    steep = CostModel([1], WIDTHS, [[1.0 + 2.0 * (w - 1) for w in WIDTHS]])  # every node doubles a step
    assert generate(stub, torch.tensor([[1, 2]]), 13, mode="tree", cost_model=steep).stats.tree_nodes == 1


def test_the_tree_choice_order():
    flat = CostModel([1], WIDTHS, [[1.0] * 16])
    saved = [[0], [0, 0]]
    assert default_tree(HintedStub(tree=saved), 4, 1, flat)[1] == "cost-aware"
    assert default_tree(HintedStub(tree=saved), 4, 1, "off") == (saved, "saved")  # no costs: the saved tree
    assert default_tree(HintedStub(acceptance=None, tree=saved), 4, 1, flat) == (saved, "saved")
    assert default_tree(HintedStub(acceptance=None), 4, 1, flat) == ("medium", "preset")
    assert default_tree(RankedStub(SCRIPT), 3, 1, "auto") == ("medium", "preset")  # a model with no hints
    paths, _ = default_tree(HintedStub(), 2, 1, flat)
    assert max(len(p) for p in paths) <= 2  # cut to num_draft heads
    stub = HintedStub(tree=saved)
    assert generate(stub, torch.tensor([[1, 2]]), 8, mode="tree", tree="chain", cost_model=flat).stats.chosen_by \
        == "given tree"
    assert generate(stub, torch.tensor([[1, 2]]), 8, mode="tree", tree_budget=3, cost_model=flat).stats.chosen_by \
        == "dynamic"
    with pytest.raises(MultitokenError, match="draft_acceptance"):
        default_tree(HintedStub(acceptance=torch.ones(3)), 4, 1, flat)


def test_the_spec_policy_drafts_what_the_flat_verify_cost_allows():
    policy = DraftLengthPolicy(8, cost_model=FLAT_TO_4)
    for _ in range(30):
        policy.update(accepted=8, drafted=8)
    assert policy.choose() == 3  # 3 drafts + the pending token: the last free width
    out = generate(RankedStub(SCRIPT), torch.tensor([[1, 2]]), 17, mode="spec", cost_model=FLAT_TO_4)
    assert out.tokens[0] == SCRIPT[2:19] and out.stats.chosen_by == "cost model"
    assert out.stats.draft_lengths[3] == sum(out.stats.draft_lengths) == out.stats.forward_passes - 1


def test_a_larger_batch_drafts_less():
    # Verify cost grows with the tokens of the whole batch: nearly flat for one row, steep for eight.
    cost = CostModel([1, 8], [1, 2, 4, 8], [[1.0, 1.02, 1.05, 1.1], [1.5, 2.5, 4.5, 8.5]], [[0.02] * 7] * 2)
    picks = {}
    for batch in (1, 8):
        policy = DraftLengthPolicy(7, cost_model=cost, batch=batch)
        for i in range(40):
            policy.update(accepted=min(i % 4, 3), drafted=7)  # drafts 1..3 often right, later ones never
        picks[batch] = policy.choose()
    assert picks[1] > picks[8] >= 0
    assert DraftLengthPolicy(7, draft_cost=0.1, cost_model=cost).step_cost(2) == cost.step_cost(2)


def test_draft_cost_and_off_override_the_cost_model():
    stub = RankedStub(SCRIPT)
    assert generate(stub, torch.tensor([[1, 2]]), 9, mode="spec", draft_cost=0.1,
                    cost_model=FLAT_TO_4).stats.chosen_by == "draft_cost"
    fixed = generate(stub, torch.tensor([[1, 2]]), 9, mode="spec", cost_model="off").stats
    assert fixed.chosen_by == "fixed" and fixed.draft_lengths[3] == fixed.forward_passes - 1
    with pytest.raises(MultitokenError, match="cost_model"):
        generate(stub, torch.tensor([[1, 2]]), 4, cost_model="cheap")


@pytest.fixture(scope="module")
def cost_cache_dir(tmp_path_factory):
    old = os.environ.get("MULTITOKEN_CACHE")
    os.environ["MULTITOKEN_CACHE"] = str(tmp_path_factory.mktemp("costs"))
    yield
    if old is None:
        os.environ.pop("MULTITOKEN_CACHE")
    else:
        os.environ["MULTITOKEN_CACHE"] = old


@settings(max_examples=15, deadline=None)
@given(head_type=st.sampled_from(HEAD_TYPES), seed=st.integers(0, 3), mode=st.sampled_from(["spec", "tree"]),
       batch=st.integers(1, 3), scripted=st.booleans(), data=st.data())
def test_cost_aware_defaults_keep_greedy_output_identical(cost_cache_dir, head_type, seed, mode, batch, scripted,
                                                          data):
    """Calibrated ("auto", cached per model) or scripted costs, any acceptance table: greedy
    output equals plain decoding."""
    model = tiny_model(head_type, n_future=4, seed=seed, vocab_size=8)
    g = torch.Generator().manual_seed(seed)
    model.draft_acceptance = torch.rand(3, 4, generator=g) * torch.tensor([1.0, 0.4, 0.2, 0.1])
    cost = "auto"
    if scripted:
        slope = data.draw(st.sampled_from([0.0, 0.05, 0.5]))
        cost = CostModel([1, 4], WIDTHS, [[1 + slope * (w - 1) for w in WIDTHS], [2 + 4 * slope * w for w in WIDTHS]],
                         [[data.draw(st.sampled_from([0.0, 0.3]))] * 3] * 2)
    prompts = [torch.randint(0, 8, (int(n),), generator=g) for n in torch.randint(1, 9, (batch,), generator=g)]
    out = generate(model, prompts, 16, mode=mode, cost_model=cost)
    assert out.tokens == generate(model, prompts, 16).tokens
    assert out.stats.chosen_by == ("cost model" if mode == "spec" else "cost-aware")
    assert sum(out.stats.draft_lengths) == out.stats.forward_passes - 1
    if mode == "tree":
        assert 1 <= out.stats.tree_nodes <= 15


def test_the_cost_aware_tree_is_cut_to_the_depth_that_pays_each_step():
    """Heads that are always wrong (the true token ranked last): after a few steps the default tree
    verifies the pending token alone, probing now and then; heads that are always right keep the
    whole tree. Output is the script either way."""
    cost = CostModel([1], WIDTHS, [[1.0 + 0.1 * (w - 1) for w in WIDTHS]], [[0.05 * k for k in range(8)]])

    def run(rank):
        stub = HintedStub()
        stub.rank = rank
        depths = []
        real_draft = stub.draft
        stub.draft = lambda state, nxt, k, pick: depths.append(k) or real_draft(state, nxt, k, pick)
        out = generate(stub, torch.tensor([[1, 2]]), 60, mode="tree", cost_model=cost, prompt_lookup=0)
        assert out.tokens[0] == SCRIPT[2:62] and out.stats.chosen_by == "cost-aware"
        return out.stats.forward_passes, depths

    passes, depths = run(lambda length, j: 9)  # never in the tree
    assert passes == 60 and 0 < len(depths) <= 15  # a few steps to learn, then a probe every 8th step
    passes, depths = run(lambda length, j: 0)  # always the top candidate
    # From the prior (every level reached half the time) up to the whole tree, and there it stays; the
    # last step drafts only what the row may still emit.
    assert passes < 25 and depths[:-1] == sorted(depths[:-1]) and depths[-4:-1] == [4, 4, 4]
