import pytest

from multitoken import MTPConfig


def test_json_round_trip(tmp_path):
    cfg = MTPConfig(vocab_size=100, d_model=64, n_head=4, n_kv_head=2, n_future=3, head_type="sequential")
    cfg.save(tmp_path / "config.json")
    assert MTPConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("field,value,needle", [
    ("n_future", 0, "n_future"),
    ("head_type", "medusa", "head_type"),
    ("d_model", 30, "d_model"),
    ("n_kv_head", 3, "n_kv_head"),
])
def test_invalid_values_name_the_field_and_allowed_values(field, value, needle):
    with pytest.raises(ValueError, match=needle) as err:
        MTPConfig(**{field: value})
    assert "allowed" in str(err.value)


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown key"):
        MTPConfig.from_dict({"n_futur": 2})


def test_linear_heads_cannot_share_the_unembedding():
    assert MTPConfig(head_type="linear").share_embeddings is False
    with pytest.raises(ValueError, match="share_embeddings"):
        MTPConfig(head_type="linear", share_embeddings=True)
