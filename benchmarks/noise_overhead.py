"""Training-step overhead of the noise layers: noisy step / plain step, three networks.

One step = forward + backward + Adam step (cross-entropy, plus ``kl(model, "mean")`` for the
noisy networks) on:

* LeNet5, MNIST-sized 1x32x32 input, batch 128 (real MNIST when it loads, random tensors otherwise);
* ResNet-18 for CIFAR (3x3 stem, no max-pool), 3x32x32, batch 128, random tensors;
* torchvision ResNet-50, 3x224x224, batch 32, random tensors.

Per network, the plain model and one noisy copy per sharing mode ('channel' = the default of
``add_noise``, 'structure', 'element') are measured side by side: blocks of steps interleaved
over the variants after a warm-up, so that the drifts of a shared machine hit every variant
alike, and the medians of the per-step times are compared.  Both clocks are reported: wall
time, and the process CPU time (less sensitive to other processes taking the cores; with more
than one thread it also counts the worker threads' spinning).  The load average is printed
before and after each network.

    python benchmarks/noise_overhead.py [--nets lenet5,resnet18,resnet50] [--variants ...]
        [--modes eager,channels_last,compile] [--steps 30] [--big-steps 3] [--threads 2]
        [--profile] [--dtypes] [--count-ops] [--adam default|foreach|fused] [--data DIR]

``--modes``: how both the plain and the noisy networks run, each mode with its own plain
network, all measured in the same interleaved loop (the order rotated every round): ``eager``,
``channels_last`` (model and input in channels-last memory format) and ``compile``
(``torch.compile`` of the model, default inductor backend; the first step, which compiles, is
timed apart and printed as the build time).  Each row: median ms per step, the ratio to the plain
network of the same mode and its spread over the rounds (lowest-highest of the per-round ratios
of block means), the same on the CPU clock, and the ratio to the eager plain network.
``--variants`` also takes the ablations ``channel-nobn`` (the default noise without the fused
BatchNorm-and-noise node) and ``channel-products`` (without it nor the one-pass noise backward).
``--adam``: the Adam implementation of every variant (plain and noisy alike): torch's default
(on CPU a loop over the parameters, ~10 ops each), ``foreach`` or ``fused``.
``--profile`` adds, per network, the torch.profiler per-op self CPU time of the default noisy
step beside the plain step (the ops the noise adds calls to); ``--dtypes`` lists the ops of one
noisy step that compute in float64, with their largest output; ``--count-ops`` the number of
ATen operations one eager step of each variant dispatches (the noise's cost on LeNet5 is mostly
their count, not their size).  Targets (issue "speed"):
ratio <= 1.15 on LeNet5, <= 1.05 on ResNet-18 and ResNet-50.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import bayesprune
from bayesprune.experiments.models import LeNet5, cifar_resnet18

VARIANTS = ("plain", "channel", "structure", "element")
#: measured only when named in --variants, for the ablation: the default noise without the fused
#: BatchNorm-and-noise node (noise._noisy_batch_norm), and without it nor the one-pass noise
#: backward (noise._one_pass_backward: two products and a reduction instead)
ABLATIONS = ("channel-nobn", "channel-products")
NETS = {  # name: (input shape per example, batch, default steps key, target ratio)
    "lenet5": ((1, 32, 32), 128, "steps", 1.15),
    "resnet18": ((3, 32, 32), 128, "big_steps", 1.05),
    "resnet50": ((3, 224, 224), 32, "big_steps", 1.05),
}
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def build(net: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if net == "lenet5":
        return LeNet5(in_channels=1, num_classes=10, image_size=32)
    if net == "resnet18":
        return cifar_resnet18(num_classes=10)
    if net == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None, num_classes=1000)
    raise ValueError(f"unknown network {net!r}; valid: {', '.join(NETS)}")


def batches(net: str, batch: int, count: int, data: str | None):
    """``count`` (x, y) batches and a line saying where they come from."""
    shape = NETS[net][0]
    classes = 1000 if net == "resnet50" else 10
    g = torch.Generator().manual_seed(0)
    if net == "lenet5" and data:
        try:
            from bayesprune.experiments.data import load_dataset

            train = load_dataset("mnist", data).train
            idx = torch.randperm(len(train.labels), generator=g)[: batch * count]
            x, y = train.images[idx].float().contiguous(), train.labels[idx].long()
            return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(count)], \
                f"real MNIST ({len(train.labels)} training images, 1x32x32)"
        except Exception as err:  # noqa: BLE001 - fall back to random data, say so
            why = f" (MNIST did not load: {type(err).__name__}: {err})"
    else:
        why = ""
    out = [(torch.randn(batch, *shape, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(count)]
    return out, f"random {'x'.join(map(str, shape))} tensors{why}"


MODES = ("eager", "channels_last", "compile")
COMPILE_RECOMPILE_LIMIT = 64


#: Adam implementations (--adam): torch's default (a loop over the parameters on CPU), foreach, fused
ADAM = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make(net: str, variant: str, example, mode: str = "eager", adam: str = "default"):
    """``(callable model, optimiser, module)`` of one variant in one mode; ``module`` is the
    uncompiled network (its noise layers give the KL).  ``adam``: a key of :data:`ADAM`, the same
    for the plain and the noisy networks."""
    model = build(net)
    if variant != "plain":
        bayesprune.add_noise(model, example, sharing=variant.split("-")[0])
    model.train()
    if mode == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, **ADAM[adam])
    run = model
    if mode == "compile":
        # every variant of a network shares its forward code: room for one graph set per variant,
        # not dynamo's default 8 recompiles per code object (beyond which it runs eagerly)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)
        # by default dynamo does not guard on module hooks: a noisy copy of a network compiled
        # before in this process would silently run the plain network's graph, without its noise
        torch._dynamo.config.skip_nnmodule_hook_guards = False
        run = torch.compile(model)
    return run, opt, model


def step(model, opt, x, y, variant: str, module=None, mode: str = "eager") -> tuple[float, float]:
    """One training step; (wall seconds, process CPU seconds)."""
    if variant in ABLATIONS:
        with _without(("_noisy_batch_norm",) + (("_one_pass_backward",) if variant == "channel-products" else ())):
            return step(model, opt, x, y, "channel", module, mode)
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    if variant != "plain":
        loss = loss + bayesprune.kl(model if module is None else module, "mean")
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, time.process_time() - c0


@contextlib.contextmanager
def _without(names):
    """The noise layers with the named fast paths of bayesprune.noise turned off (they return
    None, the fallback), for the ablation variants."""
    import bayesprune.noise as noise

    kept = {n: getattr(noise, n) for n in names}
    for n in names:
        setattr(noise, n, lambda *args: None)
    try:
        yield
    finally:
        for n, f in kept.items():
            setattr(noise, n, f)


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def measure(net: str, variants, steps: int, block: int, warmup: int, data, modes=("eager",), adam: str = "default"):
    """Per (mode, variant): median (wall, cpu) seconds per step, the per-round block means and
    the first step's wall time, measured interleaved (the order rotated each round)."""
    shape, batch, _, _ = NETS[net]
    xs, source = batches(net, batch, 8 if net == "lenet5" else 2, data)
    keys = [(m, v) for m in modes for v in variants]
    runs = {k: make(net, k[1], xs[0][0][:2], k[0], adam) for k in keys}
    print(f"{net}: batch {batch}, input {'x'.join(map(str, shape))}, {source}; {load()}", flush=True)
    first = {}
    for k in keys:
        model, opt, module = runs[k]
        for i in range(warmup):
            w, _ = step(model, opt, *xs[i % len(xs)], k[1], module, k[0])
            first.setdefault(k, w)
    times = {k: [] for k in keys}
    rounds = {k: [] for k in keys}
    j = 0
    while min(len(t) for t in times.values()) < steps:
        order = keys[j % len(keys):] + keys[:j % len(keys)]  # rotated: no variant always first
        for k in order:
            model, opt, module = runs[k]
            got = [step(model, opt, *xs[(j * block + i) % len(xs)], k[1], module, k[0]) for i in range(block)]
            times[k] += got
            rounds[k].append((statistics.fmean(w for w, _ in got), statistics.fmean(c for _, c in got)))
        j += 1
    med = {k: (statistics.median(w for w, _ in t[:steps]), statistics.median(c for _, c in t[:steps])) for k, t in times.items()}
    return {"median": med, "rounds": rounds, "first": first}, runs, xs


def _label(variant: str) -> str:
    if variant == "plain":
        return "plain"
    if variant in ABLATIONS:
        return "noise+KL " + {"channel-nobn": "channel, no BN fusion", "channel-products": "channel, products"}[variant]
    return f"noise+KL {variant}" + (" (default)" if variant == bayesprune.DEFAULT_SHARING else "")


def report(net: str, result: dict, steps: int, block: int, warmup: int) -> None:
    """One row per (mode, variant): ratios to the same mode's plain network and to eager plain."""
    target = NETS[net][3]
    med, rounds = result["median"], result["rounds"]
    modes = list(dict.fromkeys(m for m, _ in med))
    base = med.get(("eager", "plain"))
    print(f"{'mode':<14}{'variant':<30} {'wall ms':>10} {'ratio':>7} {'spread':>13} {'cpu ms':>10} {'ratio':>7} "
          f"{'spread':>13} {'vs eager':>8}")
    for (mode, v), (w, c) in med.items():
        w0, c0 = med[(mode, "plain")]
        spreads = []
        for i in (0, 1):  # wall, cpu
            per_round = sorted(a[i] / b[i] for a, b in zip(rounds[(mode, v)], rounds[(mode, "plain")]))
            spreads.append(f"{per_round[0]:.3f}-{per_round[-1]:.3f}")
        vs_eager = f"{w / base[0]:.3f}" if base else "-"
        print(f"{mode:<14}{_label(v):<30} {1e3 * w:>10.1f} {w / w0:>7.3f} {spreads[0]:>13} {1e3 * c:>10.1f} {c / c0:>7.3f} "
              f"{spreads[1]:>13} {vs_eager:>8}")
    if "compile" in modes:
        from torch._dynamo.utils import counters

        print("compile: first step (builds the graphs) "
              + ", ".join(f"{_label(v)} {s:.1f} s" for (m, v), s in result["first"].items() if m == "compile")
              + f"; dynamo: {counters['stats']['unique_graphs']} graphs, "
              + f"{sum(counters['graph_break'].values())} graph breaks, recompile limit hit "
              + f"{counters['frames'].get('recompile_limit_hit', 0) + counters['stats'].get('cache_size_limit_hit', 0)} times")
    print(f"({steps} steps per variant in interleaved blocks of {block}, {warmup} warm-up, order rotated each round; "
          f"spread: lowest-highest ratio of the {len(next(iter(rounds.values())))} rounds' block means, per clock; "
          f"target ratio <= {target}; {load()})", flush=True)


def float64_ops(runs: dict, xs, variant: str) -> list[tuple[str, int, int]]:
    """``(op, calls, largest output in elements)`` of the ops that produce float64 tensors in one
    ``variant`` step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    found: dict[str, list[int]] = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    entry = found.setdefault(str(func.overloadpacket.__name__), [0, 0])
                    entry[0] += 1
                    entry[1] = max(entry[1], t.numel())
            return out

    model, opt, module = runs[("eager", variant)]
    with Watch():
        step(model, opt, *xs[0], variant, module)
    return sorted(((k, n, e) for k, (n, e) in found.items()), key=lambda r: -r[2])


def count_ops(runs: dict, xs, variants) -> dict[str, int]:
    """ATen operations dispatched in one eager step of each variant (views and detaches included)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    out = {}
    for v in variants:
        model, opt, module = runs[("eager", v)]
        with Count() as c:
            step(model, opt, *xs[0], v, module)
        out[v] = c.n
    return out


def profile(net: str, runs: dict, xs, variant: str, steps: int, rows: int = 14) -> None:
    """Per-op self CPU ms per step, plain against ``variant`` (steps interleaved): first the ops
    the noise adds (more calls in the noisy step), largest extra time first; then the summed
    difference of the ops called as often in both (the same work: the machine's noise)."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    per = {"plain": {}, variant: {}}
    for i in range(steps):
        for v in ("plain", variant):
            model, opt, module = runs[("eager", v)]
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                step(model, opt, *xs[i % len(xs)], v, module)
            for e in prof.key_averages():
                t, n = per[v].get(e.key, (0.0, 0))
                per[v][e.key] = (t + e.self_cpu_time_total / 1e3 / steps, n + e.count / steps)
    zero = (0.0, 0)
    names = set(per["plain"]) | set(per[variant])
    added = sorted((k for k in names if per[variant].get(k, zero)[1] > per["plain"].get(k, zero)[1]),
                   key=lambda k: -(per[variant].get(k, zero)[0] - per["plain"].get(k, zero)[0]))
    same = [k for k in names if per[variant].get(k, zero)[1] == per["plain"].get(k, zero)[1]]
    total = {v: sum(t for t, _ in per[v].values()) for v in per}
    print(f"profile {net}, {steps} steps each, self CPU ms per step (calls): plain {total['plain']:.1f}, "
          f"{variant} {total[variant]:.1f} ({total[variant] - total['plain']:+.1f}); ops the noise adds calls to:")
    for k in added[:rows]:
        (tp, np_), (tv, nv) = per["plain"].get(k, zero), per[variant].get(k, zero)
        print(f"  {k[:48]:<48} {tp:>9.2f} ({np_:>4.0f}) {tv:>9.2f} ({nv:>4.0f}) {tv - tp:>+9.2f}")
    rest = sum(per[variant].get(k, zero)[0] - per["plain"].get(k, zero)[0] for k in added[rows:])
    print(f"  the other {max(len(added) - rows, 0)} such ops together {rest:+.2f}; the {len(same)} ops called as often "
          f"in both: {sum(per[variant][k][0] - per['plain'][k][0] for k in same):+.2f} in all")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS), help="comma-separated: " + ", ".join(NETS))
    ap.add_argument("--variants", default=None,
                    help="noisy variants (plain is always measured); default: all, but 'element' not on resnet50")
    ap.add_argument("--steps", type=int, default=30, help="measured steps per variant, LeNet5")
    ap.add_argument("--big-steps", type=int, default=2, help="measured steps per variant, the ResNets")
    ap.add_argument("--block", type=int, default=5, help="steps per interleaved block, LeNet5 (ResNets: 1)")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant, LeNet5 (ResNets: 1)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--modes", default="eager", help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--profile", action="store_true", help="per-op profile of the default variant against plain")
    ap.add_argument("--dtypes", action="store_true", help="list the float64 ops of one default noisy step")
    ap.add_argument("--count-ops", action="store_true", help="ATen operations per step of each eager variant")
    ap.add_argument("--adam", default="default", choices=list(ADAM),
                    help="Adam implementation, the same for every variant (default: torch's CPU default)")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="MNIST directory for LeNet5 ('' for random data)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    nets = [n for n in args.nets.split(",") if n]
    for n in nets:
        if n not in NETS:
            raise SystemExit(f"--nets: unknown network {n!r}; valid: {', '.join(NETS)}")
    variants = ["plain"] + [v for v in (args.variants or ",".join(VARIANTS)).split(",") if v and v != "plain"]
    for v in variants:
        if v not in VARIANTS + ABLATIONS:
            raise SystemExit(f"--variants: unknown variant {v!r}; valid: {', '.join(VARIANTS + ABLATIONS)}")
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: unknown mode {m!r}; valid: {', '.join(MODES)}")
    print(f"date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} CPUs ({platform.machine()}), python {platform.python_version()}; "
          f"default sharing {bayesprune.DEFAULT_SHARING!r}; Adam {args.adam}")
    for net in nets:
        small = net == "lenet5"
        steps, block, warmup = (args.steps, args.block, args.warmup) if small else (args.big_steps, 1, 1)
        chosen = variants
        if net == "resnet50" and args.variants is None:  # 1 draw per activation element: ~10 GB, minutes a step
            chosen = [v for v in variants if v != "element"]
            print("resnet50: 'element' not run by default (one draw per activation element keeps ~10 GB of "
                  "draws and takes minutes per step on 2 cores); --variants element runs it")
        want = list(dict.fromkeys(modes + (["eager"] if args.profile or args.dtypes or args.count_ops else [])))
        result, runs, xs = measure(net, chosen, steps, block, warmup, args.data if small else None, want, args.adam)
        report(net, result, steps, block, warmup)
        default = ("eager", bayesprune.DEFAULT_SHARING)
        if args.dtypes and default in runs:
            ops = float64_ops(runs, xs, default[1])
            print(f"float64 ops in one {default[1]} step: " + (", ".join(f"{k} x{n} (<= {e} elements)" for k, n, e in ops) or "none"))
        if args.count_ops:
            counts = count_ops(runs, xs, chosen)
            print("ATen ops per step: " + ", ".join(f"{_label(v)} {n} ({n - counts['plain']:+d})" for v, n in counts.items()))
        if args.profile and default in runs:
            profile(net, runs, xs, default[1], steps=10 if small else 2)
        del runs


if __name__ == "__main__":
    main()
