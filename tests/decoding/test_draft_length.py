"""Adaptive draft length: the policy's choices, and exactness of decoding with it."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_model
from multitoken.decoding import DraftLengthPolicy, generate


def test_policy_follows_acceptance_and_cost():
    always = DraftLengthPolicy(4, draft_cost=0.1)
    for _ in range(30):
        always.update(accepted=4, drafted=4)
    assert always.choose() == 4
    never = DraftLengthPolicy(4, draft_cost=0.1)
    for _ in range(30):
        never.update(accepted=0, drafted=4)
    choices = [never.choose() for _ in range(16)]
    assert set(choices) == {0, 1} and choices.count(1) == 2  # plain steps, with a one-draft probe every 8th
    half = DraftLengthPolicy(4, draft_cost=0.1)
    for i in range(40):
        half.update(accepted=i % 2, drafted=4)  # first draft accepted half the time, the second never
    assert half.choose() == 1
    assert DraftLengthPolicy(4, draft_cost=5.0).choose() == 0  # drafts dearer than what they can win
    for bad in (dict(max_draft=0), dict(max_draft=2, draft_cost=-1), dict(max_draft=2, decay=0)):
        with pytest.raises(ValueError):
            DraftLengthPolicy(**bad)
    with pytest.raises(ValueError, match="modes spec and draft"):
        generate(tiny_model("residual"), torch.tensor([[1, 2, 3]]), 4, mode="tree", draft_cost=0.1)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), head_type=st.sampled_from(["residual", "sequential", "transformer"]),
       cost=st.sampled_from([0.0, 0.1, 0.5, 2.0]), temperature=st.sampled_from([0.0, 0.0, 1.0]))
def test_adaptive_decoding_is_exact(seed, head_type, cost, temperature):
    """Any draft length is exact: greedy equals plain decoding token for token; sampling runs
    with the same statistics bookkeeping."""
    model = tiny_model(head_type, n_future=4, seed=seed % 7)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 48, (int(n),), generator=gen) for n in torch.randint(1, 12, (2,), generator=gen)]
    out = generate(model, prompts, 24, mode="spec", draft_cost=cost, temperature=temperature, seed=seed)
    assert 0.0 <= out.stats.drafts_per_step <= 3.0
    assert all(a <= t for a, t in zip(out.stats.draft_accepted, out.stats.draft_attempted))
    if temperature == 0.0:
        assert out.tokens == generate(model, prompts, 24, mode="ar").tokens
