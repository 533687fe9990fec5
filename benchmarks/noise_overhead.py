"""Training-step overhead of the noise layers: LeNet5 with noise + KL against the plain LeNet5.

One step = forward + backward + Adam step on a batch of 128 (cross-entropy, plus the KL for the
noisy networks).  The plain network and the noisy ones ('channel', 'structure' and 'element'
sharing: one draw per (example, channel), per channel for the whole batch, per element) are
measured side by side in one run: interleaved blocks of steps after a warm-up, so that drifts of a
shared machine hit every variant alike; the medians of the per-step times are compared.

A fifth variant, 'floor', is the cost of the noise machinery alone: 'structure' noise layers whose
sampler and KL are replaced by the cheapest stand-ins (theta = exp(mu) * mask, KL = sum of mu^2
and log_sigma^2), so it keeps the hooks, the multiplies, their backward and the optimizer's extra
parameters.  No sampler or KL, however fast, can bring a variant below the floor.

    python benchmarks/noise_overhead.py [--steps 50] [--block 5] [--threads N] [--data PATH]

Uses real MNIST (bayesprune.experiments.data.load_dataset('mnist', PATH)) when it loads, random 1x32x32
tensors otherwise; the output says which.  Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from contextlib import nullcontext
from unittest import mock

import torch
import torch.nn.functional as F

import bayesprune
import bayesprune.noise as noise_module

try:
    from bayesprune.experiments.models import LeNet5
except ImportError:  # pragma: no cover - the project ships LeNet5
    LeNet5 = None


def batches(path: str, batch: int, count: int):
    try:
        from bayesprune.experiments.data import load_dataset

        splits = load_dataset("mnist", path)
        x, y = splits.train.tensors if hasattr(splits.train, "tensors") else (splits.train.images, splits.train.labels)
        source = f"real MNIST from {path} ({len(y)} training images, 1x32x32)"
    except Exception as err:  # noqa: BLE001 - fall back to random data, say so
        x, y = torch.randn(batch * count, 1, 32, 32), torch.randint(0, 10, (batch * count,))
        source = f"random 1x32x32 tensors (MNIST did not load: {type(err).__name__}: {err})"
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(y), generator=g)[: batch * count]
    xs, ys = x[idx].float().contiguous(), y[idx].long()
    return [(xs[i * batch:(i + 1) * batch], ys[i * batch:(i + 1) * batch]) for i in range(count)], source


def make(variant: str, example):
    torch.manual_seed(0)
    model = LeNet5(in_channels=1, num_classes=10, image_size=32)
    if variant != "plain":
        bayesprune.add_noise(model, example, sharing="structure" if variant == "floor" else variant)
    model.train()
    return model, torch.optim.Adam(model.parameters(), lr=1.4e-3)


def _floor_draw(mu, sigma, mask, u, a, b):
    return (torch.exp(mu) * mask).expand_as(u)


def step(model, opt, x, y, variant: str) -> float:
    # 'floor' swaps the sampler for the step only; the swap itself is outside the timed part
    swap = mock.patch.object(noise_module, "draw_theta", _floor_draw) if variant == "floor" else nullcontext()
    with swap:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if variant == "floor":
            loss = loss + sum((n.mu ** 2).sum() + (n.log_sigma ** 2).sum() for n in bayesprune.noise_layers(model))
        elif variant != "plain":
            loss = loss + bayesprune.kl(model, "mean")
        loss.backward()
        opt.step()
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50, help="measured steps per variant")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block")
    ap.add_argument("--warmup", type=int, default=5, help="warm-up steps per variant")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--data", default="/work/shared/datasets/mnist")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data, source = batches(args.data, args.batch, 16)
    variants = ["plain", "channel", "structure", "element", "floor"]
    runs = {v: make(v, data[0][0][:2]) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print(f"data: {source}; batch {args.batch}, CPU")
    for v in variants:  # warm-up
        for i in range(args.warmup):
            step(*runs[v], *data[i % len(data)], v)
    k = 0
    while min(len(t) for t in times.values()) < args.steps:
        for v in variants:  # interleaved A/B/C blocks
            for _ in range(args.block):
                x, y = data[k % len(data)]
                k += 1
                times[v].append(step(*runs[v], x, y, v))
    med = {v: statistics.median(t[: args.steps]) for v, t in times.items()}
    print(f"{'variant':<22} {'median ms/step':>15} {'ratio':>7}")
    print(f"{'plain LeNet5':<22} {1e3 * med['plain']:>15.2f} {1.0:>7.3f}")
    for v in variants[1:]:
        label = "floor (no sampler/KL)" if v == "floor" else "noise+KL " + v
        print(f"{label:<22} {1e3 * med[v]:>15.2f} {med[v] / med['plain']:>7.3f}")
    print(f"({args.steps} steps per variant in blocks of {args.block}, {args.warmup} warm-up; target ratio <= 1.15)")


if __name__ == "__main__":
    main()
