"""Speed-up of physically removing BMRS_N-pruned structures, on CPU.

Trains LeNet5 and the MLP briefly on MNIST with noise layers (cross-entropy + KL), prunes with
BMRS_N, shrinks, and prints parameters, MACs and median interleaved CPU latency at batch 1 and
128 of the dense original vs the shrunk network.  Target: latency speed-up at batch 128 of at
least 0.8 x the MAC reduction.

    python benchmarks/shrink_speedup.py [--steps 50] [--emulate 0.6] [--threads N] [--data DIR]
    python benchmarks/shrink_speedup.py --runs RUN_DIR [RUN_DIR ...]   # masks of real BMRS runs
    python benchmarks/shrink_speedup.py --runs RUN_DIR --layers       # + where the time goes
    python benchmarks/shrink_speedup.py --runs RUN_DIR --runtimes     # + frozen TorchScript, onnxruntime

With ``--runs``, each run directory (of ``bayesprune run`` / ``reproduce``) gives the network and
the masks its continuous BMRS pruning set (checkpoint.pt, loaded with weights_only=True).  A run
directory without a checkpoint (the small files committed under results/) gives only the number
of structures each layer kept (the last line of metrics.jsonl): the first k structures of each
layer are kept in a freshly initialised network, which has the same shapes, hence the same MACs
and latency, but not the run's accuracy.  ``--layers`` prints, per layer, MACs and median latency
of the original and the shrunk network at batch 128 (forward hooks).  ``--runtimes`` times both
networks at batch 128 also as frozen TorchScript and under onnxruntime.
Otherwise a short CPU run prunes nothing yet, so by default the posteriors of the lowest-SNR 60 %
of each layer's structures are collapsed (mu = -19, sigma = 1) before ``prune(model, "bmrs_n")``
decides; ``--emulate 0`` uses only the trained posteriors.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

import bayesprune as bp
from bayesprune.benchmarking import format_report, machine_info
from bayesprune.experiments.data import load_dataset
from bayesprune.experiments.models import MLP, LeNet5


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
        rep = bp.prune(model, "bmrs_n", prior_odds=1)  # the exact rule (the collapsed ones are far past it)
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
    ap.add_argument("--layers", action="store_true", help="per-layer MACs and latency at batch 128")
    ap.add_argument("--runtimes", action="store_true",
                    help="also time both networks frozen (torch.jit.freeze) and under onnxruntime at batch 128")
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
        if args.layers:
            print(layer_table(model, shrunk, shape))
        if args.runtimes:
            print(runtime_table(model, shrunk, shape))


def _leaf_calls(model, x, repeats):
    """{leaf module name: (median ms, MACs per example, type name)} over ``repeats`` forwards."""
    times, macs, kinds, starts = {}, {}, {}, {}
    handles = []
    for name, mod in model.named_modules():
        if next(mod.children(), None) is not None:
            continue

        def pre(m, args):
            starts[m] = time.perf_counter()

        def post(m, args, out, n=name):
            times.setdefault(n, []).append(time.perf_counter() - starts[m])
            per_out = out.numel() // out.shape[0]
            if isinstance(m, torch.nn.modules.conv._ConvNd):
                macs[n] = per_out * (m.in_channels // m.groups) * math.prod(m.kernel_size)
            elif isinstance(m, torch.nn.Linear):
                macs[n] = per_out * m.in_features
            else:
                macs[n] = 0
            kinds[n] = type(m).__name__

        handles += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]
    with torch.no_grad():
        for _ in range(3 + repeats):
            model(x)
    for h in handles:
        h.remove()
    return {n: (1e3 * statistics.median(t[3:]), macs[n], kinds[n]) for n, t in times.items()}


def layer_table(model, shrunk, shape, batch=128, repeats=60):
    """Where the batch-``batch`` time goes: MACs and median latency per layer, original vs shrunk."""
    from bayesprune.benchmarking import _plain

    a, b = _plain(model), _plain(shrunk)
    x = torch.randn(batch, *shape)
    la, lb = _leaf_calls(a, x, repeats), _leaf_calls(b, x, repeats)
    lines = [f"{'layer':<8}{'type':<12}{'MACs/ex orig':>13}{'shrunk':>9}{'ms orig':>9}{'shrunk':>8}{'speed-up':>9}"]
    for n, (ta, ma, kind) in la.items():
        tb, mb, _ = lb.get(n, (float("nan"), 0, kind))
        lines.append(f"{n:<8}{kind:<12}{ma:>13,}{mb:>9,}{ta:>9.3f}{tb:>8.3f}{ta / tb:>8.2f}x")
    sa, sb = sum(v[0] for v in la.values()), sum(v[0] for v in lb.values())
    lines.append(f"{'sum':<20}{sum(v[1] for v in la.values()):>13,}{sum(v[1] for v in lb.values()):>9,}"
                 f"{sa:>9.3f}{sb:>8.3f}{sa / sb:>8.2f}x")
    return "\n".join(lines)


def report(name, model, shrunk, shape, budget):
    r = bp.size_speed_report(model, shrunk, torch.zeros(1, *shape), batch_sizes=(1, 128), budget_s=budget)
    print(format_report(r, f"{name}: "))
    ok = r.latency[128].speedup >= 0.8 * r.macs_ratio
    print(f"{name}: target (batch-128 speed-up >= 0.8 x MAC reduction): {'met' if ok else 'NOT met'}")
    return r


def measure_run(run_dir, args):
    """The network of a finished or interrupted run, with the masks its pruning set."""
    from pathlib import Path

    from bayesprune.experiments.training import _build, resolve_config

    run = Path(run_dir)
    cfg = json.loads((run / "config.json").read_text())
    keep = ("model", "dataset", "width", "extra_layers", "sharing")
    rc = resolve_config(**{k: cfg[k] for k in keep}, data_dir=args.data_dir, device="cpu")
    data = load_dataset(rc.dataset, args.data_dir)
    model, example = _build(rc, data, torch.device("cpu"))
    if (run / "checkpoint.pt").exists():
        state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
        model.load_state_dict(state)
        source = "trained weights and masks"
    else:  # committed small files: only how many structures each layer kept
        kept = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["kept"]
        for n, k in zip(bp.noise_layers(model), kept.values()):
            n.mask.zero_()
            n.mask[: int(k)] = 1.0
        source = f"kept counts {list(kept.values())} from metrics.jsonl, fresh weights (no checkpoint)"
    model.eval()
    shrunk = bp.shrink(model, example)
    with torch.no_grad():
        xt = data.test.images[:512]
        y_masked, y_shrunk = model(xt), shrunk.eval()(xt)
    err = float((y_masked - y_shrunk).abs().max() / y_masked.abs().max())
    name = f"{cfg['model']}/{cfg['dataset']}/{cfg['method']}"
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    print(f"\n== {name} ({run}; {source}): run's test acc {summary.get('test_acc', float('nan')):.4f}, "
          f"{bp.report(model, criterion='masks')}")
    print(f"shrunk vs masked eval output: max abs diff / scale = {err:.2e}")
    report(name, model, shrunk, data.input_shape, args.budget)
    if args.layers:
        print(layer_table(model, shrunk, data.input_shape))
    if args.runtimes:
        print(runtime_table(model, shrunk, data.input_shape))


def runtime_table(model, shrunk, shape, batch=128, budget=2.0):
    """Batch-``batch`` latency of original and shrunk network in eager PyTorch, as frozen
    TorchScript (``torch.jit.freeze`` + ``optimize_for_inference``) and under onnxruntime (CPU,
    same thread count; exported and checked by ``bayesprune.export_onnx``), each pair timed
    interleaved by the size/speed report's ``_latencies``."""
    import tempfile
    from pathlib import Path

    from bayesprune.benchmarking import _latencies, _plain

    a, b = _plain(model), _plain(shrunk)
    x = torch.randn(batch, *shape)
    pairs = [("eager", a, b)]
    with torch.no_grad():
        fa, fb = (torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x))) for m in (a, b))
    pairs.append(("frozen TorchScript", fa, fb))
    try:
        import onnxruntime as ort
    except ImportError:
        ort = None
    if ort is not None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = torch.get_num_threads()
        runners = []
        with tempfile.TemporaryDirectory() as tmp:
            for i, m in enumerate((a, b)):
                path = Path(tmp) / f"{i}.onnx"
                bp.export_onnx(m, path, x[:8])
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                runners.append(lambda t, sess=sess: sess.run(None, {"input": t.numpy()}))
        pairs.append(("onnxruntime", *runners))
    rows = [(name, *(1e3 * t for t in _latencies(fa_, fb_, x, 10, budget))) for name, fa_, fb_ in pairs]
    lines = [f"{'runtime (batch ' + str(batch) + ')':<22}{'orig ms':>9}{'shrunk ms':>11}{'speed-up':>10}"]
    lines += [f"{name:<22}{ta:>9.3f}{tb:>11.3f}{ta / tb:>9.2f}x" for name, ta, tb in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
