"""Size and speed of a shrunk model against its original.

:func:`size_speed_report` counts parameters and MACs (Torch-Pruning's ``count_ops_and_params``)
and measures CPU latency of both models at each batch size, interleaved: every repetition runs
A then B, or B then A (alternating), so drifts of a shared machine hit both alike; the median
over repetitions is reported.  Ratios are ``original / shrunk`` (> 1 means smaller/faster).
The input is the one given to ``add_noise`` (or the shape :func:`bayesprune.shrink` recorded)
unless another batch is passed; only its shape per example matters.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ._lazy import lazy_import
from .noise import noise_layers, remove_noise, stored_example_inputs
from .removal import count_parameters, example_from_spec

_tp = lazy_import("bayesprune._torch_pruning")  # Torch-Pruning is imported when first used

__all__ = ["size_speed_report", "SizeSpeedReport", "Latency", "machine_info", "format_report"]


@dataclass
class Latency:
    """Median latency in milliseconds of both models at one batch size."""

    original_ms: float
    shrunk_ms: float

    @property
    def speedup(self) -> float:
        return self.original_ms / self.shrunk_ms


@dataclass
class SizeSpeedReport:
    """Parameters, MACs (at batch 1) and latency per batch size of an original and its shrunk model."""

    params_original: int
    params_shrunk: int
    macs_original: int
    macs_shrunk: int
    latency: dict[int, Latency] = field(default_factory=dict)
    threads: int = 1

    @property
    def params_ratio(self) -> float:
        return self.params_original / self.params_shrunk

    @property
    def macs_ratio(self) -> float:
        return self.macs_original / self.macs_shrunk

    def to_dict(self) -> dict:
        """``{"params": {original, shrunk, ratio}, "macs": {...}, "latency_ms": {batch: {original,
        shrunk, speedup}}, "threads": n}`` (the layout of the run summaries)."""
        return {
            "params": {"original": self.params_original, "shrunk": self.params_shrunk, "ratio": self.params_ratio},
            "macs": {"original": self.macs_original, "shrunk": self.macs_shrunk, "ratio": self.macs_ratio},
            "latency_ms": {bs: {"original": t.original_ms, "shrunk": t.shrunk_ms, "speedup": t.speedup}
                           for bs, t in self.latency.items()},
            "threads": self.threads,
        }


def _example_shape(original, shrunk, example_inputs) -> tuple[int, ...]:
    """Shape of one example: of ``example_inputs``, else of the input kept by ``original``'s noise
    layers, else of the one ``shrunk`` records."""
    if example_inputs is None:
        example_inputs = stored_example_inputs(original)
    if example_inputs is None and getattr(shrunk, "bayesprune_pruning", None) is not None:
        example_inputs = example_from_spec(shrunk.bayesprune_pruning)
    if example_inputs is None:
        raise ValueError("no example input: pass example_inputs (a batch), or an original with noise layers "
                         "(add_noise keeps its input) or a shrunk model from bayesprune.shrink")
    if not torch.is_tensor(example_inputs) or example_inputs.ndim < 1:
        raise TypeError("size_speed_report measures models of one input tensor [batch, ...]; "
                        f"got {type(example_inputs).__name__}")
    return tuple(int(v) for v in example_inputs.shape[1:])


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
    example_inputs=None,
    *,
    batch_sizes=(1, 128),
    min_repeats: int = 10,
    budget_s: float = 3.0,
) -> SizeSpeedReport:
    """Parameters, MACs and median CPU latency of ``original`` vs ``shrunk``.

    ``example_inputs``: a batch shaped like the model's input (only the shape per example is
    used); by default the input given to ``add_noise``.  Noise layers of either model are removed
    first (the original is measured dense, masks not applied).  ``budget_s`` is roughly the time
    spent per batch size.  Ratios are original / shrunk.
    """
    shape = _example_shape(original, shrunk, example_inputs)
    a, b = _plain(original), _plain(shrunk)
    x1 = torch.randn(1, *shape)
    macs_a, _ = _tp.count_ops_and_params(a, example_inputs=x1)
    macs_b, _ = _tp.count_ops_and_params(b, example_inputs=x1)
    report = SizeSpeedReport(count_parameters(a), count_parameters(b), int(macs_a), int(macs_b),
                             threads=torch.get_num_threads())
    for bs in batch_sizes:
        ta, tb = _latencies(a, b, torch.randn(bs, *shape), min_repeats, budget_s)
        report.latency[int(bs)] = Latency(1e3 * ta, 1e3 * tb)
    return report


def format_report(report: SizeSpeedReport | dict, name: str = "") -> str:
    """A few aligned lines for logs and docs (of a report or its ``to_dict()``)."""
    if isinstance(report, SizeSpeedReport):
        report = report.to_dict()
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
