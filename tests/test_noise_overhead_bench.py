"""benchmarks/noise_overhead.py: every variant trains, and the 'floor' swap does not leak.

The benchmark module is loaded from its file with importlib (benchmarks/ is not a package).
Checks: one step of each variant updates the noise parameters (finite; 'plain' has none) and
leaves ``bayesprune.noise.draw_theta`` as it was (the 'floor' swap does not outlive its step);
the floor's stand-in sampler is exp(mu) * mask; the script's main prints one ratio row per
variant on random data.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import bayesprune
import bayesprune.noise as noise_module
from benchmark_module import BENCHMARKS, load_benchmark  # tests/benchmark_module.py

PATH = BENCHMARKS / "noise_overhead.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("noise_overhead")


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)


@pytest.mark.parametrize("variant", ["plain", "channel", "structure", "element", "floor"])
def test_each_variant_steps_and_restores_the_sampler(bench, variant):
    original = noise_module.draw_theta
    x, y = _batch()
    model, opt = bench.make(variant, x[:2])
    layers = bayesprune.noise_layers(model)
    assert (len(layers) == 0) == (variant == "plain")
    before = [layer.mu.detach().clone() for layer in layers]
    seconds = bench.step(model, opt, x, y, variant)
    assert seconds > 0
    assert noise_module.draw_theta is original
    for layer, mu0 in zip(layers, before):
        assert torch.isfinite(layer.mu).all()
        assert not torch.equal(layer.mu, mu0)  # the step reached the noise parameters


def test_floor_draw_is_exp_mu_times_mask(bench):
    mu = torch.tensor([0.0, -1.0, 0.5])
    mask = torch.tensor([1.0, 0.0, 1.0])
    u = torch.rand(4, 3)
    theta = bench._floor_draw(mu, torch.ones(3), mask, u, -20.0, 0.0)
    assert theta.shape == (4, 3)
    assert torch.allclose(theta, (mu.exp() * mask).expand(4, 3))


def test_main_prints_a_ratio_per_variant(tmp_path):
    out = subprocess.run(
        [sys.executable, str(PATH), "--steps", "2", "--warmup", "1", "--block", "1", "--batch", "16",
         "--threads", "1", "--data", str(tmp_path / "no-mnist")],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    assert "random 1x32x32 tensors (MNIST did not load" in out
    rows = {}
    for line in out.splitlines():
        for label in ("plain LeNet5", "noise+KL channel", "noise+KL structure", "noise+KL element",
                      "floor (no sampler/KL)"):
            if line.startswith(label):
                ms, ratio = line[len(label):].split()
                rows[label] = (float(ms), float(ratio))
    assert len(rows) == 5
    assert rows["plain LeNet5"][1] == 1.0
    for ms, ratio in rows.values():
        assert ms > 0 and math.isfinite(ratio) and ratio > 0
