"""Verify-pass cost by block width."""
import pytest

from multitoken.measure.verify_cost import verify_cost_by_width
from conftest import tiny_model

def test_verify_cost_by_width_rows():
    model = tiny_model("transformer", n_future=4, seed=0)
    rows = verify_cost_by_width(model, [1, 4, 16], prefix_len=20, repeats=2)
    assert [r["width"] for r in rows] == [1, 4, 16]
    assert all(r["seconds"] > 0 and r["min_seconds"] <= r["seconds"] for r in rows)
    assert rows[0]["relative"] == 1.0
    with pytest.raises(ValueError, match="prefix_len"):
        verify_cost_by_width(model, [4], prefix_len=200)
