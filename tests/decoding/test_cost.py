"""Pass costs: the CostModel's lookups, and calibration through the model's protocol."""
import io

import pytest

from conftest import tiny_model
from multitoken.decoding import CostModel, calibrate
from multitoken.decoding.cost import PassTimer, interpolate
from multitoken.errors import MultitokenError


def test_interpolate_is_piecewise_linear_and_extends_past_the_ends():
    assert interpolate([1, 3], [1.0, 2.0], 2) == 1.5
    assert interpolate([1, 3], [1.0, 2.0], 5) == 3.0  # the last slope, continued
    assert interpolate([1, 3, 4], [1.0, 2.0, 4.0], 0) == 0.5
    assert interpolate([4], [7.0], 100) == 7.0


def test_cost_model_lookups():
    cost = CostModel(batches=[1, 4], widths=[1, 2, 4], verify=[[1.0, 1.1, 1.3], [1.2, 1.6, 2.4]],
                     draft=[[0.1, 0.2], [0.15, 0.3]])
    assert cost.verify_cost(1) == 1.0 and cost.verify_cost(3) == pytest.approx(1.2)
    assert cost.verify_cost(8) == pytest.approx(1.7)  # past the widths: the last slope
    assert cost.verify_cost(2, batch=4) == pytest.approx(1.6)
    assert cost.verify_cost(2, batch=7) == pytest.approx(2.1)  # past the batches: linear in rows
    assert cost.draft_cost(0) == 0.0 and cost.draft_cost(2) == pytest.approx(0.2)
    assert cost.draft_cost(3) == pytest.approx(0.3)  # one more head, at the last head's step
    assert cost.step_cost(2) == pytest.approx(cost.verify_cost(3) + cost.draft_cost(2))
    assert cost.step_cost(1, width=4) == pytest.approx(1.3 + 0.1)  # a tree: its width, drafted to depth 1
    assert CostModel.from_dict(cost.to_dict()) == cost
    assert CostModel([1], [1], [[1.0]]).draft_cost(3) == 0.0  # no heads measured


@pytest.mark.parametrize("record", [
    {"batches": [1], "widths": [1, 2], "verify": [[1.0]]},  # a width without a cost
    {"batches": [4, 1], "widths": [1], "verify": [[1.0], [1.0]]},  # batches not ascending
    {"batches": [1], "widths": [1], "verify": [[-1.0]]},
    {"batches": [1], "widths": [1], "verify": [[float("nan")]]},
    {"widths": [1], "verify": [[1.0]]},
    {"batches": [1], "widths": [1], "verify": "fast"},
])
def test_bad_cost_records_are_refused(record):
    with pytest.raises(MultitokenError):
        CostModel.from_dict(record)


def test_calibration_measures_every_width_and_head_relative_to_a_plain_step():
    model = tiny_model("sequential", n_future=4, seed=0)  # heads with their own decode state
    out = io.StringIO()
    cost = calibrate(model, batches=(1, 2), widths=(1, 2, 4, 8), repeats=2, progress=out)
    assert cost.batches == [1, 2] and cost.widths == [1, 2, 4, 8] and cost.plain_seconds > 0
    assert cost.verify[0][0] == 1.0 and len(cost.draft[0]) == 3
    for row in cost.verify + cost.draft:
        assert row == sorted(row) and min(row) > 0  # never cheaper for more tokens
    assert out.getvalue().count("\n") == 1 and "calibrating decode costs" in out.getvalue()


def test_calibration_fits_a_short_context():
    model = tiny_model("residual", n_future=3, seed=0, max_seq_len=24)
    cost = calibrate(model, repeats=1, progress=None)
    assert cost.widths[0] == 1 and cost.widths[-1] <= 24 // 2
    with pytest.raises(MultitokenError, match="prefix_len"):
        PassTimer(model, 1, 20, 8)
