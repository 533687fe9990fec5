"""Speed-up of physically removing pruned structures, on CPU, per runtime and with ``round_to``.

Default mode (``--nets``): LeNet5 (MNIST shape), the CIFAR ResNet-18, torchvision's ResNet-50
(224 x 224) and MobileNetV2 (224 x 224), and a ViT-small (timm ``VisionTransformer``: width 384,
depth 12, 6 heads, patch 16; ``--vit-size`` pixels), fresh weights, with noise layers, masks of a
realistic shape, shrunk with and without ``round_to``.  Printed per network: parameters, MACs,
MAC ratio, and the median latency and speed-up against the dense network per runtime (eager,
eager channels_last, torch.compile, frozen TorchScript, onnxruntime), every variant of one
runtime timed interleaved (round-robin, rotating order) in the same loop.

Masks: LeNet5 keeps the per-layer counts of a real 50-epoch BMRS_N run
(results/repro/bmrs-table1/lenet5-mnist-bmrs_n-t-0.919/seed0: 1/6, 5/16, 27/120, 21/84); the
others a fixed profile: layer i of n keeps ``keep_first + (keep_last - keep_first) * i / (n-1)``
of its structures (default 0.5 -> 0.25, the later, wider layers pruned more, as BMRS does), the
ones of largest incoming-weight L2 norm; ``round_to`` revives by the same L2 score.  The ViT is
pruned on its MLP hidden features (attention and the residual width stay: Torch-Pruning cannot
remove q/k/v features through timm's reshape, and the residual width is tied to LayerNorm).

    python benchmarks/shrink_speedup.py [--nets lenet5 resnet18 resnet50 mobilenetv2 vit]
        [--runtimes eager channels_last compile torchscript onnxruntime] [--round-to 8 16 32]
        [--reps 5] [--threads N]

Target: speed-up >= 0.8 x MAC ratio.  LeNet5 also gets a per-layer table at batch 128 (where the
time goes: fixed per-op costs that no MAC reduction removes).

Older modes:

    python benchmarks/shrink_speedup.py --mnist [--steps 50] [--emulate 0.6] [--data DIR]
    python benchmarks/shrink_speedup.py --runs RUN_DIR [RUN_DIR ...]   # masks of real BMRS runs
    python benchmarks/shrink_speedup.py --runs RUN_DIR --layers       # + where the time goes
    python benchmarks/shrink_speedup.py --runs RUN_DIR --runtimes     # + frozen TorchScript, onnxruntime

``--mnist`` trains LeNet5 and the MLP briefly on MNIST with noise layers (cross-entropy + KL),
prunes with BMRS_N, shrinks, and prints parameters, MACs and median interleaved CPU latency at
batch 1 and 128.  With ``--runs``, each run directory (of ``bayesprune run`` / ``reproduce``) gives the network and
the masks its continuous BMRS pruning set (checkpoint.pt, loaded with weights_only=True).  A run
directory without a checkpoint (the small files committed under results/) gives only the number
of structures each layer kept (the last line of metrics.jsonl): the first k structures of each
layer are kept in a freshly initialised network, which has the same shapes, hence the same MACs
and latency, but not the run's accuracy.  ``--layers`` prints, per layer, MACs and median latency
of the original and the shrunk network at batch 128 (forward hooks).  ``--runtimes`` times both
networks at batch 128 also as frozen TorchScript and under onnxruntime.
In ``--mnist`` a short CPU run prunes nothing yet, so by default the posteriors of the lowest-SNR 60 %
of each layer's structures are collapsed (mu = -19, sigma = 1) before ``prune(model, "bmrs_n")``
decides; ``--emulate 0`` uses only the trained posteriors.
"""

from __future__ import annotations

import argparse
import copy
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
    ap.add_argument("--runtimes", nargs="*", default=None, choices=RUNTIMES,
                    help="runtimes of the default mode (default: all); with --runs/--mnist and no value: "
                         "also time both networks frozen (torch.jit.freeze) and under onnxruntime at batch 128")
    ap.add_argument("--mnist", action="store_true", help="the older mode: short MNIST training of LeNet5 and the MLP")
    ap.add_argument("--nets", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    ap.add_argument("--round-to", type=int, nargs="*", default=[8, 16, 32], help="round_to values besides none")
    ap.add_argument("--reps", type=int, default=5, help="interleaved timed rounds per runtime (default mode)")
    ap.add_argument("--keep", type=float, nargs=2, default=[0.5, 0.25], metavar=("FIRST", "LAST"),
                    help="keep fraction of the first and the last layer of the fixed profile")
    ap.add_argument("--vit-size", type=int, default=112, help="ViT input size in pixels (224: ViT-S/16's own)")
    args = ap.parse_args()
    import os

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    print("machine:", json.dumps(machine_info()))
    print("load average (1, 5, 15 min):", " ".join(f"{v:.2f}" for v in os.getloadavg()))
    if args.runs:
        for run in args.runs:
            measure_run(run, args)
        return
    if not args.mnist:
        for name in args.nets:
            measure_network(name, args)
        print("load average (1, 5, 15 min) at the end:", " ".join(f"{v:.2f}" for v in os.getloadavg()))
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
        if args.runtimes is not None:
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
    if args.runtimes is not None:
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


# ---------------------------------------------------------------------------------------------
# default mode: five networks x runtimes x round_to

RUNTIMES = ("eager", "channels_last", "compile", "torchscript", "onnxruntime")

#: LeNet5 per-layer kept counts of results/repro/bmrs-table1/lenet5-mnist-bmrs_n-t-0.919/seed0 (last epoch)
LENET5_BMRS_KEPT = (1, 5, 27, 21)


def _vit(size):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=size, patch_size=16, embed_dim=384, depth=12, num_heads=6, num_classes=1000)


def _tv(name):
    import torchvision

    return getattr(torchvision.models, name)(weights=None)


#: name -> (constructor(args), input shape per example(args), batch)
NETWORKS = {
    "lenet5": (lambda a: LeNet5(1, 10, image_size=28), lambda a: (1, 28, 28), 128),
    "resnet18": (lambda a: __import__("bayesprune.experiments.models", fromlist=["x"]).cifar_resnet18(), lambda a: (3, 32, 32), 128),
    "resnet50": (lambda a: _tv("resnet50"), lambda a: (3, 224, 224), 32),
    "mobilenetv2": (lambda a: _tv("mobilenet_v2"), lambda a: (3, 224, 224), 32),
    "vit": (lambda a: _vit(a.vit_size), lambda a: (3, a.vit_size, a.vit_size), 32),
}


def _set_masks(name, model, keep_first, keep_last):
    """Masks of a realistic shape (module docstring): the real LeNet5 counts, else the profile."""
    layers = bp.noise_layers(model)
    score = bp.scores(model, "l2")
    for i, (n, sc) in enumerate(zip(layers, score)):
        if name == "lenet5":
            k = LENET5_BMRS_KEPT[i]
        else:
            f = keep_first + (keep_last - keep_first) * i / max(1, len(layers) - 1)
            k = max(1, round(f * n.num_structures))
        n.mask.zero_()
        n.mask[torch.argsort(sc, descending=True)[:k]] = 1.0
    return "kept counts of a real BMRS_N run" if name == "lenet5" else f"profile {keep_first:g} -> {keep_last:g}"


def _runner(kind, m, x):
    """(callable taking the input, the input it wants, seconds to build) for one runtime."""
    import tempfile
    from pathlib import Path

    t = time.perf_counter()
    if kind == "eager":
        return m, x, 0.0
    if kind == "channels_last":
        if x.ndim != 4:
            return m, x, 0.0
        m2 = copy.deepcopy(m).to(memory_format=torch.channels_last)
        return m2, x.contiguous(memory_format=torch.channels_last), 0.0
    if kind == "compile":
        f = torch.compile(m)
        with torch.inference_mode():
            f(x)  # compiles
        return f, x, time.perf_counter() - t
    if kind == "torchscript":
        with torch.no_grad():
            f = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(m, x[:2])))
            f(x)
        return f, x, time.perf_counter() - t
    if kind == "onnxruntime":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            bp.export_onnx(m, path, x[:2])
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        return (lambda _x: sess.run(None, {"input": xn})), x, time.perf_counter() - t
    raise ValueError(f"unknown runtime {kind!r}; valid: {', '.join(RUNTIMES)}")


def _interleaved(fns, xs, reps, warmup=2):
    """Median seconds of each ``fns[i](xs[i])``: ``reps`` rounds, each running all once, the
    order rotated every round, so a shared machine's drifts hit every variant alike."""
    with torch.inference_mode():
        for _ in range(warmup):
            for f, x in zip(fns, xs):
                f(x)
        times = [[] for _ in fns]
        for r in range(reps):
            order = list(range(len(fns)))
            order = order[r % len(order):] + order[: r % len(order)]
            for i in order:
                t = time.perf_counter()
                fns[i](xs[i])
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def measure_network(name, args):
    from bayesprune import _torch_pruning as _tp
    from bayesprune.benchmarking import _plain
    from bayesprune.pruning import round_masks

    build, shape_of, batch = NETWORKS[name]
    shape = shape_of(args)
    torch.manual_seed(0)
    model = build(args).eval()
    x2 = torch.randn(2, *shape)
    t0 = time.perf_counter()
    layers = None
    if name == "vit":
        layers = [n for n, m in model.named_modules() if n.endswith("mlp.fc1")]
    bp.add_noise(model, x2, layers=layers)
    model.eval()
    how = _set_masks(name, model, *args.keep)
    variants = [("dense", _plain(model))]
    reports = {}
    shrunk = bp.shrink(model)
    variants.append(("shrunk", shrunk.eval()))
    for k in args.round_to:
        m = copy.deepcopy(model)
        reports[k] = round_masks(m, k, "l2")
        variants.append((f"round_to={k}", bp.shrink(m).eval()))
    prep_s = time.perf_counter() - t0
    with torch.no_grad():
        y0, y1 = model(x2), shrunk(x2)
    err = float((y0 - y1).abs().max() / y0.abs().max())
    x1 = torch.randn(1, *shape)
    stats = []
    for label, m in variants:
        macs, _ = _tp.count_ops_and_params(m, example_inputs=x1)
        stats.append((label, bp.count_parameters(m), int(macs)))
    print(f"\n== {name}: input {tuple(shape)}, batch {batch}, masks: {how} "
          f"({len(bp.noise_layers(model))} noise layers; noise, masks and shrinks {prep_s:.0f} s; "
          f"shrunk vs masked eval output {err:.1e} of its scale)")
    for k, rep in reports.items():
        print(f"   round_to={k}: parameters removed {100 * rep.param_compression_unrounded:.2f} % -> "
              f"{100 * rep.param_compression:.2f} % (rounding cost {100 * rep.rounding_cost:.2f} points)")
    x = torch.randn(batch, *shape)
    results, builds = {}, {}
    for kind in args.runtimes or RUNTIMES:
        try:
            runners = [_runner(kind, m, x) for _, m in variants]
        except Exception as e:  # a runtime that cannot take this network: say so, go on
            print(f"   {kind}: not measured ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        builds[kind] = sum(r[2] for r in runners)
        results[kind] = _interleaved([r[0] for r in runners], [r[1] for r in runners], args.reps)
    head = f"   {'variant':<13}{'params':>12}{'MACs':>15}{'MAC ratio':>10}"
    head += "".join(f"{k[:13]:>24}" for k in results)
    print(head)
    print(f"   {'':<50}" + "".join(f"{'ms  speed-up (/MACs)':>24}" for _ in results))
    dense_macs = stats[0][2]
    for i, (label, params, macs) in enumerate(stats):
        row = f"   {label:<13}{params:>12,}{macs:>15,}{dense_macs / macs:>9.2f}x"
        for kind, t in results.items():
            sp = t[0] / t[i]
            row += f"{1e3 * t[i]:>10.2f}{sp:>7.2f}x ({sp / (dense_macs / macs):.2f})"
        print(row)
    if results:
        best = min(results, key=lambda k: results[k][0])
        print(f"   fastest dense runtime: {best}; fastest shrunk (no rounding): "
              f"{min(results, key=lambda k: results[k][1])}; build s (compile/trace/export, all variants): "
              + ", ".join(f"{k} {v:.0f}" for k, v in builds.items() if v))
    if name == "lenet5":
        print(layer_table(model, shrunk, shape))


if __name__ == "__main__":
    main()
