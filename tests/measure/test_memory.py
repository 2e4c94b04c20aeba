import pytest

from multitoken.measure.memory import bench_memory

TINY = dict(vocab_size=96, d_model=32, n_layer=1, seq_len=16, batch_size=2, repeats=1)


def test_bench_memory_rows_ratios_and_gradient_check():
    result = bench_memory(n_futures=[1, 2], isolate=False, **TINY)
    rows = result["rows"]
    assert [(r["n_future"], r["method"]) for r in rows] == [
        (1, "naive"), (1, "mtp"), (1, "mtp_chunked"), (2, "naive"), (2, "mtp"), (2, "mtp_chunked")]
    for r in rows:
        assert r["step_s"] > 0 and r["cpu_s"] >= 0 and r["peak_mb"] is not None
        assert r["time_vs_naive"] is not None
        if r["method"] == "naive":
            assert r["max_grad_diff"] is None and r["time_vs_naive"] == 1.0
        else:
            assert r["max_grad_diff"] < 1e-5  # the memory-efficient gradients equal the naive ones
    assert all(r["peak_vs_n1"] in (None, 1.0) for r in rows if r["n_future"] == 1)
    assert result["benchmark"] == "memory" and result["settings"]["vocab_size"] == 96
    assert {"cpu", "cores", "torch", "threads"} <= set(result["machine"])


def test_bench_memory_isolated_worker_process():
    result = bench_memory(n_futures=[2], methods=("naive", "mtp"), isolate=True, threads=1, **TINY)
    assert [r["method"] for r in result["rows"]] == ["naive", "mtp"]
    assert result["rows"][1]["max_grad_diff"] < 1e-5
    assert "fresh worker process" in result["settings"]["peak_memory"]


def test_bench_memory_rejects_bad_input():
    with pytest.raises(ValueError, match="method"):
        bench_memory(methods=("bogus",), isolate=False, **TINY)
    with pytest.raises(ValueError, match="n_future"):
        bench_memory(n_futures=[0], isolate=False, **TINY)
