"""The kernel crossover: picked from timings, cached per machine and model shape, used by the wrapper."""
import io
import json

import pytest

from hf_fixtures import make_model
from multitoken.hf import kernel_choice
from multitoken.hf.kernel_choice import cached_min_rows, choose_min_rows, kernel_key, time_kernels
from multitoken.hf.kernels import MAX_ROWS, ONEDNN_ALWAYS, ONEDNN_NEVER, available
from multitoken.hf.wrapper import MTPHeadsForCausalLM
from multitoken.io import cache_file

pytestmark = pytest.mark.skipif(not available(), reason="oneDNN (mkldnn) is not in this torch build")


@pytest.mark.parametrize("timings,expected", [
    # (F.linear, oneDNN) seconds per width, as measured on a 2-core Xeon: F.linear wins up to 3 rows
    ({1: (28, 35), 2: (29, 37), 3: (32, 38), 4: (44, 40), 8: (60, 45), 16: (80, 50)}, 4),
    ({1: (30, 29), 4: (44, 40), 16: (80, 50)}, ONEDNN_ALWAYS),  # oneDNN everywhere (the AVX2 EPYC)
    ({1: (28, 35), 4: (40, 44), 16: (50, 80)}, ONEDNN_NEVER),  # F.linear everywhere
    ({1: (28, 35), 4: (39, 40), 8: (60, 45), 16: (80, 50)}, 8),  # oneDNN's 1 ms loss at 4 rows: from 8
    ({1: (28, 35), 4: (44, 40), 8: (40, 45), 16: (80, 50)}, 16),  # F.linear's 5 ms win at 8 beats its loss at 4
    ({1: (28, 35), 4: (44, 40), 8: (56, 48), 16: (58, 59)}, 4),  # one noisy widest width does not flip the choice
    ({1: (30, 30), 4: (40, 40)}, ONEDNN_NEVER),  # ties: the wider threshold (F.linear, as HF runs)
])
def test_choose_min_rows_from_scripted_timings(timings, expected):
    assert choose_min_rows(timings) == expected


def wrapper(seed=0, n_future=3):
    model = MTPHeadsForCausalLM(make_model(seed=seed), n_future, "sequential").eval()
    assert model.fast_kernels
    return model


def test_time_kernels_times_both_kernels_and_restores_the_setting():
    model = wrapper()
    model.kernel_min_rows = 7
    seconds = time_kernels(model, widths=(1, 2, 4), repeats=1)
    assert sorted(seconds) == [1, 2, 4] and all(a > 0 and b > 0 for a, b in seconds.values())
    assert model.kernel_min_rows == 7


def test_the_choice_is_measured_once_cached_and_used(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(kernel_choice, "time_kernels",
                        lambda model, **kw: calls.append(model) or {1: (1.0, 2.0), 4: (3.0, 2.0), 16: (9.0, 4.0)})
    model = wrapper()
    out = io.StringIO()
    assert model.kernel_min_rows is None
    assert cached_min_rows(model, progress=out) == 4 and "oneDNN from 4 rows" in out.getvalue()
    assert model.block_min_rows == 4 and model.cost_key["kernel_min_rows"] == 4 and len(calls) == 1
    other = wrapper(seed=1)  # same shapes, other weights: the file is reused
    assert other.block_min_rows == 4 and len(calls) == 1
    path = cache_file("kernels", kernel_key(model))
    assert json.loads(path.read_text())["value"] == {"min_rows": 4}
    path.write_text(json.dumps({"key": kernel_key(model), "value": {"min_rows": 0}}))  # out of range: measured again
    assert wrapper().block_min_rows == 4 and len(calls) == 2
    assert kernel_key(wrapper(n_future=4)) != kernel_key(model)  # other heads, other linears


def test_no_fast_kernels_never_measures(monkeypatch):
    monkeypatch.setattr(kernel_choice, "time_kernels", lambda *a, **k: pytest.fail("measured"))
    model = MTPHeadsForCausalLM(make_model(), 3, "sequential", fast_kernels=False)
    assert model.block_min_rows == ONEDNN_NEVER > MAX_ROWS
