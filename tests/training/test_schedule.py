import pytest

from multitoken import MTPModel
from multitoken.training import TrainConfig
from multitoken.training.schedule import lr_factor, param_groups


def test_lr_schedule_and_param_groups():
    f = [lr_factor(s, warmup=4, total=20, final_ratio=0.1) for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == 1.0 and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    model = MTPModel(TrainConfig(model=dict(d_model=32, n_layer=2)).model_config(40))
    decay, no_decay = param_groups(model, 0.1)
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay["params"]) + len(no_decay["params"]) == n_unique  # tied weights once
