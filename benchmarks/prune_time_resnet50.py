"""Seconds of ``prune`` (which shrinks, verifies and caches the network it counts) and of the
``shrink`` after it, for a torchvision ResNet-50 at 224 x 224, batch 2, one thread: 40 % of every
layer's structures masked (collapsed posteriors), BatchNorm running statistics random.

    python benchmarks/prune_time_resnet50.py
    # side by side with another version: alternate with PYTHONPATH=<its checkout>/src
"""

import os
import time

import torch
import torchvision

import bayesprune as bp


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = torchvision.models.resnet50(), torch.randn(2, 3, 224, 224)
    bp.add_noise(model, x)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            idx = torch.randperm(n.mu.numel(), generator=g)[:int(0.4 * n.mu.numel())]
            n.mu[idx] = -19.0
            n.log_sigma[idx] = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    model.eval()
    load = os.getloadavg()[0]
    t = time.perf_counter()
    bp.prune(model, "etheta")
    t_prune = time.perf_counter() - t
    t = time.perf_counter()
    small = bp.shrink(model, x)
    t_shrink = time.perf_counter() - t
    print(f"{bp.__file__}: prune {t_prune:.1f} s, shrink {t_shrink:.2f} s, "
          f"parameters {bp.count_parameters(small):,}, load average {load:.1f}")


if __name__ == "__main__":
    main()
