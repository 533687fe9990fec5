"""Size and speed of a shrunk model against its original.

:func:`size_speed_report` counts parameters and MACs (Torch-Pruning's ``count_ops_and_params``)
and measures CPU latency of both models at each batch size, interleaved: every repetition runs
A then B, or B then A (alternating), so drifts of a shared machine hit both alike; the median
over repetitions is reported.  Ratios are ``original / shrunk`` (> 1 means smaller/faster).
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import time

import torch
import torch_pruning as tp
from torch import nn

from .noise import noise_layers, remove_noise
from .removal import count_parameters

__all__ = ["size_speed_report", "machine_info", "format_report"]


def _plain(model: nn.Module) -> nn.Module:
    """An eval-mode copy without noise layers (masks are *not* applied)."""
    m = copy.deepcopy(model)
    if noise_layers(m):
        remove_noise(m)
    return m.eval()


def machine_info() -> dict:
    """Date, CPU, core count, torch version and thread setting, for benchmark records."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


@torch.no_grad()
def _latencies(a: nn.Module, b: nn.Module, x: torch.Tensor, min_repeats: int, budget_s: float) -> tuple[float, float]:
    for _ in range(3):  # warm-up (allocator, oneDNN primitive caches)
        a(x)
        b(x)
    t0 = time.perf_counter()
    a(x)
    b(x)
    pair = max(time.perf_counter() - t0, 1e-6)
    repeats = max(min_repeats, min(200, int(budget_s / pair)))
    ta, tb = [], []
    for r in range(repeats):
        order = ((a, ta), (b, tb)) if r % 2 == 0 else ((b, tb), (a, ta))
        for model, times in order:
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return statistics.median(ta), statistics.median(tb)


def size_speed_report(
    original: nn.Module,
    shrunk: nn.Module,
    example_input_shape,
    batch_sizes=(1, 128),
    min_repeats: int = 10,
    budget_s: float = 3.0,
) -> dict:
    """Parameters, MACs and median CPU latency of ``original`` vs ``shrunk``.

    ``example_input_shape``: the shape of *one* example, without the batch dimension (e.g.
    ``(1, 32, 32)``).  Noise layers of either model are removed first (the original is measured
    dense, masks not applied).  ``budget_s`` is roughly the time spent per batch size.
    Returns ``{"params": {original, shrunk, ratio}, "macs": {...}, "latency_ms": {batch:
    {original, shrunk, speedup}}, "threads": n}``; ratios are original / shrunk.
    """
    a, b = _plain(original), _plain(shrunk)
    shape = tuple(int(s) for s in example_input_shape)
    x1 = torch.randn(1, *shape)
    macs_a, _ = tp.utils.count_ops_and_params(a, example_inputs=x1)
    macs_b, _ = tp.utils.count_ops_and_params(b, example_inputs=x1)
    pa, pb = count_parameters(a), count_parameters(b)
    report = {
        "params": {"original": pa, "shrunk": pb, "ratio": pa / pb},
        "macs": {"original": int(macs_a), "shrunk": int(macs_b), "ratio": macs_a / macs_b},
        "latency_ms": {},
        "threads": torch.get_num_threads(),
    }
    for bs in batch_sizes:
        ta, tb = _latencies(a, b, torch.randn(bs, *shape), min_repeats, budget_s)
        report["latency_ms"][int(bs)] = {"original": 1e3 * ta, "shrunk": 1e3 * tb, "speedup": ta / tb}
    return report


def format_report(report: dict, name: str = "") -> str:
    """A few aligned lines for logs and docs."""
    p, m = report["params"], report["macs"]
    lines = [
        f"{name}params  {p['original']:>12,} -> {p['shrunk']:>12,}  ({p['ratio']:.2f}x smaller)",
        f"{name}MACs    {m['original']:>12,} -> {m['shrunk']:>12,}  ({m['ratio']:.2f}x fewer)",
    ]
    for bs, t in report["latency_ms"].items():
        lines.append(
            f"{name}batch {bs:>4}: {t['original']:9.3f} ms -> {t['shrunk']:9.3f} ms  "
            f"speed-up {t['speedup']:.2f}x  (= {t['speedup'] / m['ratio']:.2f} of the MAC reduction)"
        )
    return "\n".join(lines)
