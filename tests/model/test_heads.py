"""The head types behind one interface: state-dict keys (saved checkpoints and heads files
depend on them), one class per type, and borrowed modules that stay out of the heads."""
import pytest
import torch

from conftest import HEAD_TYPES, tiny_config, tiny_model
from multitoken.model import HEAD_CLASSES, Heads, MTPConfig, MTPModel

# Keys of model.heads.state_dict() for n_future=3 (two extra heads), tiny_config widths.
BLOCK = ["input_norm.weight", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight",
         "attn.o_proj.weight", "post_attn_norm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
         "mlp.down_proj.weight"]
HEAD_KEYS = {
    "linear": ["out.0.weight", "out.1.weight"],
    "residual": ["mlps.0.up.weight", "mlps.0.down.weight", "mlps.1.up.weight", "mlps.1.down.weight"],
    "modulated": ["step_embeddings", "transform.up.weight", "transform.down.weight"],
    "transformer": [f"blocks.{i}.{k}" for i in range(2) for k in BLOCK] + ["norms.0.weight", "norms.1.weight"],
    "sequential": [f"modules_.{i}.{k}" for i in range(2) for k in
                   ["emb_norm.weight", "hidden_norm.weight", "proj.weight"] + [f"block.{b}" for b in BLOCK]
                   + ["out_norm.weight"]],
}


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_state_dict_keys_are_pinned(head_type):
    model = tiny_model(head_type)
    assert list(model.heads.state_dict()) == HEAD_KEYS[head_type]
    trunk = [k for k in model.state_dict() if not k.startswith("heads.")]
    assert trunk[:2] == ["embed.weight", "layers.0.input_norm.weight"] and trunk[-2:] == ["norm.weight", "lm_head.weight"]
    assert list(MTPModel(tiny_config(head_type, n_future=1)).heads.state_dict()) == []


def test_unshared_heads_add_their_own_unembeddings():
    model = tiny_model("residual", share_embeddings=False)
    assert list(model.heads.state_dict())[-2:] == ["out.0.weight", "out.1.weight"]


def test_one_class_per_head_type():
    assert tuple(HEAD_CLASSES) == tuple(HEAD_TYPES)
    for head_type, cls in HEAD_CLASSES.items():
        heads = MTPModel(tiny_config(head_type)).heads
        assert type(heads) is cls and isinstance(heads, Heads) and heads.head_type == head_type


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_borrowed_modules_follow_the_owner(head_type):
    """The heads use the owner's lm_head/embed/rope without registering them: moving or
    converting the model moves what the heads read."""
    model = tiny_model(head_type)
    names = {n for n, _ in model.heads.named_modules()}
    assert not any(n.startswith(("shared", "lm_head", "embed", "rope")) for n in names)
    assert model.heads.shared.lm_head is model.lm_head and model.heads.shared.embed is model.embed
    model.to(torch.float64)
    tokens = torch.randint(0, 48, (2, 12))
    assert model(tokens).dtype == torch.float64


def test_bad_config_raises_the_project_error():
    from multitoken.errors import MultitokenError
    with pytest.raises(MultitokenError, match="head_type"):
        MTPConfig(head_type="medusa")
