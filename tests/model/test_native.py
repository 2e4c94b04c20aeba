import math

import pytest
import torch
import torch.nn.functional as F

from multitoken import MTPModel
from conftest import HEAD_TYPES, tiny_config, tiny_model


def reference_lm_logits(model: MTPModel, tokens: torch.Tensor) -> torch.Tensor:
    """A plain causal LM written out by hand from the model's weights (no SDPA, no cache)."""
    cfg = model.cfg
    B, T = tokens.shape
    x = model.embed.weight[tokens]
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    ang = torch.outer(pos, inv)
    cos, sin = ang.cos().float(), ang.sin().float()

    def rope(t):  # (B, H, T, Dh), rotate-half pairs (j, j + Dh/2)
        a, b = t[..., : cfg.head_dim // 2], t[..., cfg.head_dim // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    def rms(t, w):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    for layer in model.layers:
        h = rms(x, layer.input_norm.weight)
        a = layer.attn
        q = (h @ a.q_proj.weight.T).view(B, T, cfg.n_head, -1).transpose(1, 2)
        k = (h @ a.k_proj.weight.T).view(B, T, cfg.n_kv_head, -1).transpose(1, 2)
        v = (h @ a.v_proj.weight.T).view(B, T, cfg.n_kv_head, -1).transpose(1, 2)
        rep = cfg.n_head // cfg.n_kv_head
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        q, k = rope(q), rope(k)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, -1)
        x = x + att @ a.o_proj.weight.T
        h = rms(x, layer.post_attn_norm.weight)
        m = layer.mlp
        x = x + (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(x, model.norm.weight) @ model.lm_head.weight.T


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_logits_shape_every_head_type(head_type):
    model = tiny_model(head_type, n_future=4)
    tokens = torch.randint(0, 48, (2, 11))
    assert model(tokens).shape == (2, 11, 4, 48)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_n_future_1_is_exactly_a_plain_lm(head_type):
    model = tiny_model(head_type, n_future=1)
    assert sum(p.numel() for p in model.heads.parameters()) == 0
    tokens = torch.randint(0, 48, (3, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens)[:, :, 0], reference_lm_logits(model, tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_head_0_is_the_trunk_head_whatever_the_other_heads(head_type):
    multi = tiny_model(head_type, n_future=4)
    plain = MTPModel(tiny_config(head_type, n_future=1))
    plain.load_state_dict({k: v for k, v in multi.state_dict().items() if not k.startswith("heads.")})
    tokens = torch.randint(0, 48, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(multi(tokens)[:, :, 0], plain(tokens)[:, :, 0])


def test_zero_initialised_residual_heads_start_as_the_trunk_head():
    torch.manual_seed(0)
    model = MTPModel(tiny_config("residual", n_future=3))
    with torch.no_grad():
        logits = model(torch.randint(0, 48, (1, 7)))
    torch.testing.assert_close(logits[:, :, 1], logits[:, :, 0])


def test_sequential_head_k_reads_token_t_plus_k():
    model = tiny_model("sequential", n_future=3)
    tokens = torch.randint(0, 48, (1, 10))
    changed = tokens.clone()
    changed[0, 6] = (changed[0, 6] + 1) % 48  # token 6 is read by depth 1 at t=5, depth 2 at t=4
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[0, :5, 1], b[0, :5, 1]) and not torch.allclose(a[0, 5, 1], b[0, 5, 1])
    assert torch.equal(a[0, :4, 2], b[0, :4, 2]) and not torch.allclose(a[0, 4, 2], b[0, 4, 2])
    assert torch.equal(a[0, :6, 0], b[0, :6, 0])  # the trunk is causal


def test_out_of_range_token_ids_raise_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="out of range for vocab_size=48"):
        model(torch.tensor([[1, 48]]))
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[-1, 2]]))


def test_sequence_longer_than_context_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 97, dtype=torch.long))


def test_parameter_counts_split_trunk_and_heads():
    model = tiny_model("linear", n_future=3)
    counts = model.num_parameters()
    assert counts["heads"] == 2 * 32 * 48
    assert counts["total"] == sum(p.numel() for p in model.parameters())
