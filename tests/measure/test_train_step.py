import pytest

from multitoken.measure.train_step import bench_train


def test_bench_train_rows():
    result = bench_train(head_types=["residual", "sequential"], n_futures=[2], isolate=False,
                         vocab_size=64, d_model=32, n_layer=2, seq_len=16, batch_size=2, repeats=1)
    rows = result["rows"]
    assert [(r["head_type"], r["n_future"], r["backward"]) for r in rows] == [
        ("-", 1, "naive"), ("-", 1, "mtp"), ("residual", 2, "mtp"), ("sequential", 2, "mtp")]
    assert rows[0]["time_vs_ntp"] == 1.0 and rows[0]["head_params"] == 0
    assert rows[2]["head_params"] == 2 * 32 * 32  # one residual MLP
    assert rows[0]["flops_vs_ntp"] == 1.0 and rows[3]["flops_vs_ntp"] > rows[2]["flops_vs_ntp"] > 1
    for r in rows:
        assert r["tokens_per_s"] == pytest.approx(32 / r["step_s"], rel=0.01)
    with pytest.raises(ValueError, match="head type"):
        bench_train(head_types=["nope"], isolate=False)
