import pytest
import torch

from multitoken.measure.worker import PeakMemory


def test_peak_memory_sees_a_large_allocation():
    tracker = PeakMemory("cpu")
    if tracker.method == "unavailable":
        pytest.skip("no /proc/self/status on this system")
    tracker.reset()
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
    del x
    assert tracker.peak_bytes() >= 60 * 2 ** 20
