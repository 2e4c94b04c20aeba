import pytest
import torch

from multitoken import MTPConfig, MTPModel

HEAD_TYPES = ["linear", "residual", "modulated", "transformer", "sequential"]


def tiny_config(head_type: str = "residual", n_future: int = 3, **overrides) -> MTPConfig:
    base = dict(vocab_size=48, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=96,
                n_future=n_future, head_type=head_type)
    base.update(overrides)
    return MTPConfig(**base)


def tiny_model(head_type: str = "residual", n_future: int = 3, seed: int = 0, head_std: float = 0.2,
               **overrides) -> MTPModel:
    """A random tiny model whose heads are *not* at their zero init (so heads disagree)."""
    torch.manual_seed(seed)
    model = MTPModel(tiny_config(head_type, n_future, **overrides))
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=head_std)
    return model.eval()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
