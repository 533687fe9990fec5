"""Peak memory of ``prune`` (and the shrink it runs) against the size of the model's weights.

For each model (random weights, the zoo's builder), in its own process on one thread: add_noise,
one training step (optimizer state and gradients then dropped, as a user does before pruning), the
zoo's collapsed posteriors and random BatchNorm statistics, then ``prune(model, "etheta")`` while
a thread samples the resident set size (/proc/self/statm) every 10 ms.  Printed per model: the
weights' bytes, the resident size before prune, its peak during prune, and the peak's excess over
the start in multiples of the weights' bytes (the copies of the network shrink holds at once).

    python benchmarks/prune_memory.py --models tv:wide_resnet101_2 tv:resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str) -> dict:
    import torch

    import bayesprune as bp
    from zoo import _main_output, build

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = build(name)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    bp.add_noise(model, x)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    (_main_output(model(x)).float().pow(2).mean() + bp.kl(model)).backward()
    opt.step()
    del opt
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            idx = torch.randperm(n.mu.numel(), generator=g)[: int(0.4 * n.mu.numel())]
            n.mu[idx] = -19.0
            n.log_sigma[idx] = 0.0
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    model.eval()
    start = _rss()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    rep = bp.prune(model, "etheta")
    seconds = time.perf_counter() - t0
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss())
    return {"model": name, "weight_gb": weight_bytes / 1e9, "rss_start_gb": start / 1e9, "rss_peak_gb": peak[0] / 1e9,
            "excess_x_weights": (peak[0] - start) / weight_bytes, "prune_s": seconds, "params_kept": rep.params_kept}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["tv:resnet50", "tv:wide_resnet101_2"])
    p.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one model, a JSON line
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one)))
        return 0
    print("| model | weights GB | RSS before prune GB | peak RSS in prune GB | peak excess / weights | prune s | params kept |")
    print("|---|---|---|---|---|---|---|")
    for name in a.models:
        r = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True)
        if r.returncode:
            print(f"| {name} | failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:160]} |||||")
            continue
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {name} | {row['weight_gb']:.3f} | {row['rss_start_gb']:.2f} | {row['rss_peak_gb']:.2f} | "
              f"{row['excess_x_weights']:.1f}x | {row['prune_s']:.1f} | {row['params_kept']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
