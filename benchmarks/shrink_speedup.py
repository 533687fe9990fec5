"""Speed-up of physically removing BMRS_N-pruned structures, on CPU (issue 4).

Trains LeNet5 and the MLP briefly on MNIST with noise layers (cross-entropy + KL), prunes with
BMRS_N, shrinks, and prints parameters, MACs and median interleaved CPU latency at batch 1 and
128 of the dense original vs the shrunk network.  Target: latency speed-up at batch 128 of at
least 0.8 x the MAC reduction.

    python benchmarks/shrink_speedup.py [--steps 50] [--emulate 0.6] [--threads N] [--data DIR]
    python benchmarks/shrink_speedup.py --runs RUN_DIR [RUN_DIR ...]   # masks of real BMRS runs

With ``--runs``, each run directory (of ``bayesprune run`` / ``reproduce``) gives the network and
the masks its continuous BMRS pruning set (checkpoint.pt, loaded with weights_only=True).
Otherwise a short CPU run prunes nothing yet, so by default the posteriors of the lowest-SNR 60 %
of each layer's structures are collapsed (mu = -19, sigma = 1) before ``prune(model, "bmrs_n")``
decides; ``--emulate 0`` uses only the trained posteriors.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

import bayesprune as bp
from bayesprune.benchmarking import format_report, machine_info
from bayesprune.data import load_dataset
from bayesprune.models import MLP, LeNet5


def train_and_prune(model, data, steps, lr, emulate, seed=0):
    torch.manual_seed(seed)
    x_all, y_all = data.train.images, data.train.labels
    bp.add_noise(model, x_all[:1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    t = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, len(x_all), (128,))
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx]) + bp.kl(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
        xt, yt = data.test.images[:2000], data.test.labels[:2000]
        acc_before = float((model(xt).argmax(1) == yt).float().mean())
        if emulate > 0:  # emulate a longer run: the lowest-SNR posteriors collapse to theta ~ 0
            for n in bp.noise_layers(model):
                k = int(emulate * n.num_structures)
                low = torch.argsort(n.posterior().snr)[:k]
                n.mu[low], n.log_sigma[low] = -19.0, 0.0
        rep = bp.prune(model, "bmrs_n", example_inputs=x_all[:1])
        acc_after = float((model(xt).argmax(1) == yt).float().mean())
    return rep, train_s, acc_before, acc_after


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/datasets/mnist")
    ap.add_argument("--data-dir", default="/work/shared/datasets", help="data root for --runs")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--emulate", type=float, default=0.6,
                    help="share of structures per layer whose posterior is collapsed before BMRS_N decides "
                         "(stands in for a long run; 0 = only what the short run pruned)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores offered)")
    ap.add_argument("--budget", type=float, default=4.0, help="seconds of latency measurement per batch size")
    ap.add_argument("--runs", nargs="+", default=None, help="run directories whose trained masks to measure")
    args = ap.parse_args()
    import os

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    print("machine:", json.dumps(machine_info()))
    if args.runs:
        for run in args.runs:
            measure_run(run, args)
        return
    data = load_dataset("mnist", args.data)
    shape = data.input_shape
    for name, model in (
        ("lenet5", LeNet5(data.in_channels, 10, image_size=data.image_size)),
        ("mlp", MLP(data.in_channels * data.image_size**2, 10)),  # width 100, 7 extra layers, tanh
    ):
        rep, train_s, acc0, acc1 = train_and_prune(model, data, args.steps, args.lr, args.emulate)
        print(f"\n== {name}: {args.steps} Adam steps (batch 128, lr {args.lr}) in {train_s:.0f} s; "
              f"test acc {acc0:.4f} -> {acc1:.4f} after BMRS_N "
              f"(collapsed posteriors emulated for {args.emulate:.0%} of each layer's structures)")
        print(rep)
        x1 = torch.zeros(1, *shape)
        shrunk = bp.shrink(model, x1)
        with torch.no_grad():
            xt = data.test.images[:512]
            y_masked, y_shrunk = model.eval()(xt), shrunk.eval()(xt)
        err = float((y_masked - y_shrunk).abs().max() / y_masked.abs().max())
        print(f"shrunk vs masked eval output: max abs diff / scale = {err:.2e}")
        report(name, model, shrunk, shape, args.budget)


def report(name, model, shrunk, shape, budget):
    r = bp.size_speed_report(model, shrunk, shape, batch_sizes=(1, 128), budget_s=budget)
    print(format_report(r, f"{name}: "))
    ok = r["latency_ms"][128]["speedup"] >= 0.8 * r["macs"]["ratio"]
    print(f"{name}: target (batch-128 speed-up >= 0.8 x MAC reduction): {'met' if ok else 'NOT met'}")
    return r


def measure_run(run_dir, args):
    """The network of a finished or interrupted run, with the masks its pruning set."""
    from pathlib import Path

    from bayesprune.training import _build, resolve_config

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    keep = ("model", "dataset", "width", "extra_layers", "sharing")
    rc = resolve_config(**{k: cfg[k] for k in keep}, data_dir=args.data_dir, device="cpu")
    data = load_dataset(rc.dataset, args.data_dir)
    model, example = _build(rc, data, torch.device("cpu"))
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    model.load_state_dict(state)
    model.eval()
    shrunk = bp.shrink(model, example)
    with torch.no_grad():
        xt = data.test.images[:512]
        y_masked, y_shrunk = model(xt), shrunk.eval()(xt)
    err = float((y_masked - y_shrunk).abs().max() / y_masked.abs().max())
    name = f"{cfg['model']}/{cfg['dataset']}/{cfg['method']}"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    print(f"\n== {name} ({run}): test acc {summary.get('test_acc', float('nan')):.4f}, "
          f"{bp.report(model, 'masks', example)}")
    print(f"shrunk vs masked eval output: max abs diff / scale = {err:.2e}")
    report(name, model, shrunk, data.input_shape, args.budget)


if __name__ == "__main__":
    main()
