"""Suite-wide settings: one thread per test process (fast and deterministic on small CPUs), and
latency measurement stubbed wherever a test is not about latency."""

import pytest
import torch

torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "latency: the test measures latency (the timing loop is not stubbed)")


@pytest.fixture(autouse=True)
def _no_latency_loop(request, monkeypatch):
    """Replace the timed loop of size/speed reports by one forward pass of each model (the report's
    sizes and MACs stay real; the latencies are that one pass, not a measurement)."""
    if request.node.get_closest_marker("latency"):
        return
    import time

    from bayesprune import benchmarking

    def once(a, b, x, min_repeats, budget_s):
        t0 = time.perf_counter()
        with torch.no_grad():
            a(x)
            t1 = time.perf_counter()
            b(x)
        return max(t1 - t0, 1e-9), max(time.perf_counter() - t1, 1e-9)

    monkeypatch.setattr(benchmarking, "_latencies", once)
