"""The calibrated costs are cached once per model and machine, and recomputed when the file is bad."""
import io
import json

import pytest
import torch

from conftest import RankedStub, tiny_model
from multitoken.decoding import CostModel, cached_cost_model, cost_cache, cost_cache_dir
from multitoken.decoding.cost_cache import cost_file, cost_key, resolve_cost_model
from multitoken.errors import MultitokenError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path))
    calls = []
    real = cost_cache.calibrate
    monkeypatch.setattr(cost_cache, "calibrate", lambda model, **kw: calls.append(model) or real(model, repeats=1,
                                                                                                   **kw))
    return calls


def test_the_cache_is_reused_on_a_second_call(cache):
    model = tiny_model("residual", n_future=3, seed=0)
    first = cached_cost_model(model, progress=None)
    path = cost_file(cost_key(model))
    assert cache == [model] and path.parent == cost_cache_dir() and path.is_file()
    assert cached_cost_model(model, progress=None) == first and len(cache) == 1
    assert json.loads(path.read_text())["value"] == first.to_dict()


@pytest.mark.parametrize("damage", ["{not json", '{"key": 1}', "[]", "null"])
def test_a_corrupt_cache_file_is_recalibrated(cache, damage):
    model = tiny_model("residual", n_future=3, seed=0)
    cached_cost_model(model, progress=None)
    path = cost_file(cost_key(model))
    path.write_text(damage)
    again = cached_cost_model(model, progress=None)
    assert len(cache) == 2 and isinstance(again, CostModel)
    assert CostModel.from_dict(json.loads(path.read_text())["value"]) == again  # rewritten whole


def test_a_bad_costs_record_under_the_right_key_is_recalibrated(cache):
    model = tiny_model("residual", n_future=3, seed=0)
    cached_cost_model(model, progress=None)
    path = cost_file(cost_key(model))
    record = json.loads(path.read_text())
    record["value"]["verify"] = [[-1.0]]
    path.write_text(json.dumps(record))
    cached_cost_model(model, progress=None)
    assert len(cache) == 2


def test_the_key_names_model_weights_threads_and_settings():
    model = tiny_model("residual", n_future=3, seed=0)
    key = cost_key(model)
    assert key["threads"] == torch.get_num_threads() and key["torch"] == torch.__version__ and key["device"] == "cpu"
    assert cost_key(tiny_model("residual", n_future=3, seed=1))["weights"] != key["weights"]
    assert cost_key(tiny_model("residual", n_future=4, seed=0))["config"] != key["config"]
    model.identity = {"fingerprint": "abc"}
    model.cost_key = {"fast_kernels": True}
    tagged = cost_key(model)
    assert tagged["identity"] == {"fingerprint": "abc"} and tagged["path"] == {"fast_kernels": True}
    assert cost_file(tagged) != cost_file(key)
    torch.set_num_threads(2)
    try:
        assert cost_file(cost_key(model)) != cost_file(tagged)
    finally:
        torch.set_num_threads(1)


def test_an_unwritable_cache_keeps_the_costs_in_memory(cache, tmp_path, monkeypatch):
    (tmp_path / "costs").write_text("a file where the folder should be")
    out = io.StringIO()
    cost = cached_cost_model(tiny_model("residual", n_future=3, seed=0), progress=out)
    assert isinstance(cost, CostModel) and "cannot cache decode costs" in out.getvalue()


def test_resolve_cost_model(cache):
    ready = CostModel([1], [1, 2], [[1.0, 1.5]])
    assert resolve_cost_model(RankedStub([1, 2, 3]), ready) is ready
    assert resolve_cost_model(RankedStub([1, 2, 3]), "auto") is None and not cache  # a stub has nothing to measure
    assert resolve_cost_model(tiny_model(), "off") is None and resolve_cost_model(tiny_model(), None) is None
    assert isinstance(resolve_cost_model(tiny_model(), "auto"), CostModel) and len(cache) == 1
    with pytest.raises(MultitokenError, match="cost_model"):
        resolve_cost_model(tiny_model(), "fast")
