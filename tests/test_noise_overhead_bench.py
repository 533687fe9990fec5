"""benchmarks/noise_overhead.py: every network and variant trains, and the script prints a ratio row
per variant with the load.

The benchmark module is loaded from its file with importlib (benchmarks/ is not a package).
Checks: the three networks are the ones the issue names (LeNet5 on 1x32x32, the CIFAR ResNet-18 on
3x32x32, torchvision's ResNet-50 on 3x224x224, with their batch sizes); one step of each variant
updates the noise parameters (finite; 'plain' has none) and the noisy copies start from the plain
network's weights; the script's main prints one ratio row per (mode, variant) (the default marked)
on random data, each mode against its own plain network; channels-last converts model and input;
the float64 ops of a noisy step are the KL's only; and it refuses unknown names.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

import bayesprune
from benchmark_module import BENCHMARKS, load_benchmark  # tests/benchmark_module.py

PATH = BENCHMARKS / "noise_overhead.py"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("noise_overhead")


def test_networks_and_batches_are_the_issue_s(bench):
    assert {k: (v[0], v[1]) for k, v in bench.NETS.items()} == {
        "lenet5": ((1, 32, 32), 128), "resnet18": ((3, 32, 32), 128), "resnet50": ((3, 224, 224), 32)}
    assert bench.VARIANTS == ("plain", "channel", "structure", "element")
    r18 = bench.build("resnet18")
    assert r18.conv1.kernel_size == (3, 3) and isinstance(r18.maxpool, torch.nn.Identity)
    assert sum(p.numel() for p in bench.build("resnet50").parameters()) == 25557032  # torchvision's count


@pytest.mark.parametrize("variant", ["plain", "channel", "structure", "element"])
def test_each_variant_steps_and_starts_from_the_plain_weights(bench, variant):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    model, opt, _ = bench.make("lenet5", variant, x[:2])
    plain, _, _ = bench.make("lenet5", "plain", x[:2])
    noisy = dict(model.named_parameters())
    for name, p in plain.named_parameters():
        assert torch.equal(p, noisy[name]), name  # same initial weights: a like-for-like step
    layers = bayesprune.noise_layers(model)
    assert (len(layers) == 0) == (variant == "plain")
    assert all(n.sharing == variant for n in layers)
    before = [layer.mu.detach().clone() for layer in layers]
    wall, cpu = bench.step(model, opt, x, y, variant)
    assert wall > 0 and cpu > 0
    for layer, mu0 in zip(layers, before):
        assert torch.isfinite(layer.mu).all()
        assert not torch.equal(layer.mu, mu0)  # the step reached the noise parameters


def test_resnet18_noisy_step_reaches_every_batchnorm(bench):
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    model, opt, _ = bench.make("resnet18", "channel", x)
    layers = bayesprune.noise_layers(model)
    assert len(layers) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 20
    bench.step(model, opt, x, y, "channel")
    assert all(n.mu.grad is not None and torch.isfinite(n.mu.grad).all() for n in layers)


def _rows(out: str) -> dict:
    """(mode, label) -> [wall, ratio, spread low, spread high, cpu, cpu ratio, vs eager, cpu spread
    low, cpu spread high]."""
    rows = {}
    for line in out.splitlines():
        mode = line[:14].strip()
        if mode not in ("eager", "channels_last", "compile"):
            continue
        for label in ("plain", "noise+KL channel (default)", "noise+KL structure", "noise+KL element"):
            rest = line[14:]
            if rest.startswith(label + " "):
                wall, ratio, spread, cpu, cpu_ratio, cpu_spread, vs = rest[len(label):].split()
                lo, hi = spread.split("-")
                clo, chi = cpu_spread.split("-")
                rows[(mode, label)] = [float(v) for v in (wall, ratio, lo, hi, cpu, cpu_ratio, vs, clo, chi)]
    return rows


def test_main_prints_a_ratio_per_variant(bench, capsys):
    bench.main(["--nets", "lenet5", "--steps", "2", "--warmup", "1", "--block", "1", "--threads", "1", "--data", ""])
    out = capsys.readouterr().out
    assert "lenet5: batch 128, input 1x32x32, random 1x32x32 tensors" in out
    assert "load average" in out and "target ratio <= 1.15" in out and "the 2 rounds' block means" in out
    rows = _rows(out)
    assert len(rows) == 4
    assert rows[("eager", "plain")][1] == 1.0 and rows[("eager", "plain")][5] == 1.0
    plain = rows[("eager", "plain")][0]
    for wall, ratio, lo, hi, cpu, cpu_ratio, vs, clo, chi in rows.values():
        assert wall > 0 and cpu > 0 and math.isfinite(ratio) and math.isfinite(cpu_ratio)
        # the times are printed to 0.1 ms and the ratio to 0.001: the ratio of the printed times
        # can differ from the printed ratio by the two roundings
        rounding = (wall / plain) * (0.05 / wall + 0.05 / plain) + 5e-4
        assert ratio == pytest.approx(wall / plain, abs=rounding + 1e-9)
        assert vs == ratio  # eager: its own plain network is the eager one
        assert 0 < lo <= hi and 0 < clo <= chi  # per-round ratios; the median of all steps need not lie between them


def test_modes_run_side_by_side_each_against_its_own_plain_network(bench, capsys):
    bench.main(["--nets", "lenet5", "--steps", "2", "--warmup", "1", "--block", "1", "--threads", "1", "--data", "",
                "--variants", "channel", "--modes", "eager,channels_last", "--dtypes"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert set(rows) == {(m, l) for m in ("eager", "channels_last") for l in ("plain", "noise+KL channel (default)")}
    cl_plain = rows[("channels_last", "plain")]
    assert cl_plain[1] == 1.0  # against itself
    eager_plain = rows[("eager", "plain")][0]
    assert cl_plain[6] == pytest.approx(cl_plain[0] / eager_plain, abs=2e-3 + 0.1 / eager_plain)
    assert "float64 ops in one channel step:" in out


def test_channels_last_mode_converts_the_model_and_the_input(bench):
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    run, opt, module = bench.make("resnet18", "channel", x[:2], "channels_last")
    assert run is module and module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    seen = []
    module.conv1.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous(memory_format=torch.channels_last)))
    bench.step(run, opt, x, y, "channel", module, "channels_last")
    assert seen == [True]
    compiled, _, plain_module = bench.make("lenet5", "plain", torch.randn(2, 1, 32, 32), "compile")
    assert compiled is not plain_module and compiled._orig_mod is plain_module


def test_float64_ops_lists_only_the_kl(bench):
    """The noisy step computes in float32 except the KL (a few hundred structures, float64)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    runs = {("eager", "channel"): bench.make("lenet5", "channel", x[:2])}
    ops = bench.float64_ops(runs, [(x, y)], "channel")
    total = sum(n.num_structures for n in bayesprune.noise_layers(runs[("eager", "channel")][2]))
    assert ops and max(e for _, _, e in ops) <= total  # per structure, never per example or element
    assert all(n > 0 for _, n, _ in ops)


@pytest.mark.parametrize("args,message", [(["--nets", "vgg"], "--nets: unknown network 'vgg'"),
                                          (["--variants", "channels"], "--variants: unknown variant 'channels'"),
                                          (["--modes", "fx"], "--modes: unknown mode 'fx'")])
def test_main_refuses_unknown_names(bench, args, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(args)


def test_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(PATH), "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "--big-steps" in done.stdout


def test_ablation_variants_compute_the_default_s_gradients(bench):
    """'channel-nobn' and 'channel-products' turn the fast paths off, not the maths: from the same
    weights and draws, their gradients equal the default's (ResNet-18, noise after every BN)."""
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    grads = {}
    for variant in ("channel", "channel-nobn", "channel-products"):
        model, opt, module = bench.make("resnet18", variant, x[:2])
        torch.manual_seed(7)
        bench.step(model, opt, x, y, variant, module)
        grads[variant] = {k: p.grad.clone() for k, p in module.named_parameters()}
    import bayesprune.noise as noise

    assert noise._noisy_batch_norm.__name__ == "_noisy_batch_norm"  # restored after the ablation
    assert noise._one_pass_backward.__name__ == "_one_pass_backward"
    for variant in ("channel-nobn", "channel-products"):
        for k, g in grads["channel"].items():
            torch.testing.assert_close(grads[variant][k], g, rtol=2e-3, atol=2e-5, msg=f"{variant} {k}")


def test_count_ops_counts_more_operations_for_the_noisy_step(bench):
    """--count-ops: the noisy step dispatches the plain step's operations and the noise's on top."""
    x, y = torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))
    runs = {("eager", v): bench.make("lenet5", v, x[:2]) for v in ("plain", "channel")}
    counts = bench.count_ops(runs, [(x, y)], ["plain", "channel"])
    assert counts["plain"] > 50 and counts["channel"] > counts["plain"] + 50
