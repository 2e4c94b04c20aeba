import copy

import pytest
import torch
import torch.nn.functional as F

from multitoken import MTPLoss
from multitoken.training.loss import mtp_backward, naive_backward
from conftest import HEAD_TYPES, tiny_model


def fixed_ce(n=3, T=6, V=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, T, n, V, generator=g)
    tokens = torch.randint(0, V, (2, T), generator=g)
    ce = [F.cross_entropy(logits[:, : T - i - 1, i].reshape(-1, V), tokens[:, i + 1:].reshape(-1)) for i in range(n)]
    return logits, tokens, torch.stack(ce)


def test_tutorial_preset_weights():
    logits, tokens, ce = fixed_ce()
    out = MTPLoss(3, "tutorial")(logits, tokens)
    aux = (ce[1] / 2 + ce[2] / 3) / 2
    torch.testing.assert_close(out["auxiliary"], aux)
    torch.testing.assert_close(out["loss"], ce[0] + 0.1 * aux)
    torch.testing.assert_close(out["head_losses"], ce)


def test_uniform_preset_is_the_plain_sum():
    logits, tokens, ce = fixed_ce()
    out = MTPLoss(3, "uniform")(logits, tokens)
    torch.testing.assert_close(out["loss"], ce.sum())
    torch.testing.assert_close(out["primary"], ce[0])


def test_deepseek_preset_and_custom_lambda():
    logits, tokens, ce = fixed_ce()
    torch.testing.assert_close(MTPLoss(3, "deepseek")(logits, tokens)["loss"], ce[0] + 0.3 * ce[1:].mean())
    torch.testing.assert_close(MTPLoss(3, "deepseek", aux_weight=0.1)(logits, tokens)["loss"], ce[0] + 0.1 * ce[1:].mean())


def test_custom_head_weights():
    logits, tokens, ce = fixed_ce()
    out = MTPLoss(3, "uniform", head_weights=[2.0, 0.5, 0.0])(logits, tokens)
    torch.testing.assert_close(out["loss"], 2 * ce[0] + 0.5 * ce[1])


def test_no_nan_when_a_head_has_no_valid_target():
    logits, tokens = torch.randn(2, 3, 4, 5), torch.randint(0, 5, (2, 3))  # heads 2, 3: past the end everywhere
    out = MTPLoss(4, "uniform")(logits, tokens)
    assert out["head_losses"][2:].eq(0).all() and out["head_counts"][2:].eq(0).all()
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["head_accuracy"]).all()


def test_accuracy_counts_only_valid_targets():
    V = 4
    tokens = torch.tensor([[0, 1, 2, 3]])
    logits = torch.full((1, 4, 1, V), -5.0)
    logits[0, 0, 0, 1] = 5  # right
    logits[0, 1, 0, 0] = 5  # wrong (target 2)
    logits[0, 2, 0, 3] = 5  # right
    out = MTPLoss(1)(logits, tokens)
    torch.testing.assert_close(out["head_accuracy"], torch.tensor([2 / 3]))


def test_bad_arguments():
    with pytest.raises(ValueError, match="weighting"):
        MTPLoss(2, "meta")
    with pytest.raises(ValueError, match="n_future"):
        MTPLoss(0)
    with pytest.raises(ValueError, match="head_weights"):
        MTPLoss(2, head_weights=[1.0])


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("weighting,chunk", [("tutorial", None), ("uniform", 4), ("deepseek", 3)])
def test_memory_efficient_backward_equals_naive(head_type, weighting, chunk):
    model = tiny_model(head_type, n_future=4, seed=3).train()
    twin = copy.deepcopy(model)
    tokens = torch.randint(0, 48, (2, 12))
    docs = torch.tensor([[0] * 7 + [1] * 5, [0] * 12])
    loss_fn = MTPLoss(4, weighting)
    ref = naive_backward(model, loss_fn, tokens, docs, scale=0.5)
    out = mtp_backward(twin, loss_fn, tokens, docs, scale=0.5, chunk_size=chunk)
    torch.testing.assert_close(out["loss"], ref["loss"])
    torch.testing.assert_close(out["head_accuracy"], ref["head_accuracy"])
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_memory_efficient_backward_with_more_heads_than_tokens():
    model = tiny_model("sequential", n_future=4).train()
    out = mtp_backward(model, MTPLoss(4, "uniform"), torch.randint(0, 48, (1, 2)))
    assert torch.isfinite(out["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
