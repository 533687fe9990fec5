"""Does ``torch.compile`` pay for the noise's hot path on the CPU?  Eager against compiled, side by side.

The two per-step computations of the noise layers that are many small operations on LeNet5
(``noise_overhead.py --count-ops``): the joint draw of theta (``_sigma_and_slope`` then
``draw_theta_parts``, as ``noise._Draws`` calls them, on a ``[batch, total structures]`` tensor)
and the KL of every structure with its analytic gradient (``kl_log_uniform`` forward + backward,
float64).  Each is timed eagerly and under ``torch.compile`` (default inductor backend, static
shapes; the library function as it is, so dynamo breaks the graph at its data-dependent
branches), round-robin in one loop, on the structures of the noisy LeNet5 (226) and ResNet-18
for CIFAR (4,800) at batch 128.  Prints the median ms per call, compiled / eager, and the build
time of the first compiled call.

    python benchmarks/compiled_draw.py [--nets lenet5 resnet18] [--reps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time

import torch

import bayesprune
from bayesprune.distributions import draw_theta_parts, kl_log_uniform
from bayesprune.experiments.models import LeNet5, cifar_resnet18
from bayesprune.noise import _sigma_and_slope

NETS = {"lenet5": (lambda: LeNet5(in_channels=1, num_classes=10, image_size=32), (1, 32, 32)),
        "resnet18": (lambda: cifar_resnet18(num_classes=10), (3, 32, 32))}


def parts(net: str):
    """The noise parameters of the network, concatenated as the joint draw concatenates them."""
    build, shape = NETS[net]
    model = build()
    bayesprune.add_noise(model, torch.randn(2, *shape))
    layers = bayesprune.noise_layers(model)
    first = layers[0]
    mu = torch.cat([m.mu.detach() for m in layers])
    log_sigma = torch.cat([m.log_sigma.detach() for m in layers])
    mask = torch.cat([m.mask for m in layers]).float()
    return mu, log_sigma, mask, (first.a, first.b, first.log_sigma_bounds)


def draw(mu, log_sigma, mask, u, a, b, bounds):
    sigma, slope = _sigma_and_slope(log_sigma, bounds, mu.dtype)
    return draw_theta_parts(mu, sigma, mask, u, a, b) + (slope,)


def kl_step(mu, sigma, a, b):
    mu, sigma = mu.detach().requires_grad_(), sigma.detach().requires_grad_()
    kl_log_uniform(mu, sigma, a, b).sum().backward()
    return mu.grad, sigma.grad


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, torch {torch.__version__}, "
          f"threads {args.threads}, {os.cpu_count()} CPUs; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print("net        part   structures  eager ms  compiled ms  compiled/eager  build s")
    for net in args.nets:
        mu, log_sigma, mask, (a, b, bounds) = parts(net)
        mu64, sigma64 = mu.double(), log_sigma.clamp(*bounds).exp().double()
        calls = {
            "draw": (lambda f: f(mu, log_sigma, mask, torch.rand(args.batch, mu.numel()), a, b, bounds), draw),
            "kl": (lambda f: f(mu64, sigma64, a, b), kl_step),
        }
        for part, (call, fn) in calls.items():
            compiled = torch.compile(fn, dynamic=False)
            t = time.perf_counter()
            call(compiled)
            build_s = time.perf_counter() - t
            times = {"eager": [], "compiled": []}
            for _ in range(10):
                call(fn), call(compiled)
            for i in range(args.reps):
                for kind in (("eager", "compiled") if i % 2 else ("compiled", "eager")):
                    f = fn if kind == "eager" else compiled
                    t = time.perf_counter()
                    call(f)
                    times[kind].append(time.perf_counter() - t)
            e, c = (statistics.median(times[k]) * 1e3 for k in ("eager", "compiled"))
            print(f"{net:<10} {part:<6} {mu.numel():>10}  {e:8.3f}  {c:11.3f}  {c / e:14.2f}  {build_s:7.1f}")
    print(f"(median of {args.reps} calls each, alternating; load average {' '.join(f'{v:.2f}' for v in os.getloadavg())})")


if __name__ == "__main__":
    main()
