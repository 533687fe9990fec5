"""Effect of each option the Bayes-factor paper leaves open, one at a time.

One setting: digits (scikit-learn, 8x8), FCN, random and magnitude pruning to r = 0.9, Bayes-gated,
Adam lr 1e-3, batch 64.  From the defaults (hidden (256, 128), prior N(0, 1), beta 1, first log BF
+inf, likelihood = whole training set, steps 1, persistent masks) one option at a time is changed.
Per row (mean over seeds): test accuracy, final sparsity, number of epochs that pruned, the log BF
of the first pruning, the final stored log BF, dead neurons (all incoming weights zero), the
neurons ``shrink_dead`` removes and the parameters left, wall time.

    python benchmarks/bf_options.py [--epochs 15] [--seeds 0 1 2] [--out runs/bf_options]

Writes OUT.csv (one line per run) and OUT.md (the table), runs on one CPU thread.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
from pathlib import Path

import torch

from bayesprune.bayes_factor import BayesFactorPruner
from bayesprune.experiments.bf_training import train_bayes_factor
from bayesprune.benchmarking import machine_info
from bayesprune.experiments.data import load_dataset
from bayesprune.experiments.models import build_model

DEFAULTS = dict(hidden=(256, 128), prior_std=1.0, prior_mean=0.0, beta=1.0, first_log_bf=math.inf,
                likelihood_batches=None, steps=1, persistent=True)

#: (option, [values]) varied one at a time; the default value is the first row ("defaults").
VARIATIONS = [
    ("hidden", [(64, 32), (512, 256)]),
    ("prior_std", [0.1, 10.0]),
    ("prior_mean", [0.1]),
    ("beta", [0.0, 1e3, math.inf]),
    ("first_log_bf", [0.0]),
    ("likelihood_batches", [2]),
    ("steps", [5]),
    ("persistent", [False]),
]


def one_run(splits, mode, seed, epochs, opts):
    torch.manual_seed(seed)
    model = build_model("fcn", splits.in_channels, splits.image_size, splits.num_classes, hidden=opts["hidden"])
    pruner = BayesFactorPruner(
        model, mode=mode, sparsity=0.9, beta=opts["beta"], gated=True, prior_mean=opts["prior_mean"],
        prior_std=opts["prior_std"], likelihood_batches=opts["likelihood_batches"],
        first_log_bf=opts["first_log_bf"], steps=opts["steps"], persistent=opts["persistent"], seed=seed,
    )
    t0 = time.perf_counter()
    h = train_bayes_factor(model, splits, epochs=epochs, pruner=pruner, progress=False, seed=seed)
    wall = time.perf_counter() - t0
    bfs = [b for b, p in zip(h["log_bf"], h["pruned"]) if p]
    sd = h["shrink_dead"]
    return {
        "test_acc": h["test_acc"],
        "sparsity": h["sparsity"][-1],
        "prune_events": sum(bool(p) for p in h["pruned"]),
        "first_prune_log_bf": bfs[0] if bfs else math.nan,
        "final_log_bf": h["log_bf"][-1],
        "dead": sd.get("dead", math.nan),
        "removed": sd.get("removed", math.nan),
        "params_before": sd.get("params_before", math.nan),
        "params_after": sd.get("params_after", math.nan),
        "wall_s": wall,
    }


def fmt_value(v):
    if isinstance(v, tuple):
        return "(" + ", ".join(map(str, v)) + ")"
    if v is None:
        return "all"
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:g}"
    return str(v)


def mean(xs):
    xs = [x for x in xs if not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(xs) if xs else math.nan


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--modes", nargs="+", default=["random", "magnitude"])
    ap.add_argument("--out", default="runs/bf_options")
    args = ap.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    configs = [("defaults", "-", dict(DEFAULTS))]
    for opt, values in VARIATIONS:
        for v in values:
            configs.append((opt, fmt_value(v), {**DEFAULTS, opt: v}))
    splits = {s: load_dataset("digits", seed=s) for s in args.seeds}
    runs = []
    t_all = time.perf_counter()
    for mode in args.modes:
        for opt, val, opts in configs:
            for seed in args.seeds:
                r = one_run(splits[seed], mode, seed, args.epochs, opts)
                runs.append({"mode": mode, "option": opt, "value": val, "seed": seed, **r})
                print(f"{mode:9s} {opt:18s} {val:10s} seed {seed}: acc {r['test_acc']:.4f} sparsity {r['sparsity']:.3f} "
                      f"events {r['prune_events']} first log BF {r['first_prune_log_bf']:.4g} dead {r['dead']} "
                      f"removed {r['removed']} ({r['wall_s']:.1f} s)", flush=True)
    total = time.perf_counter() - t_all
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(runs[0]))
        w.writeheader()
        w.writerows(runs)
    head = ("mode", "option", "value", "test acc %", "sparsity %", "prune events", "first log BF",
            "final log BF", "dead neurons", "removed", "params after shrink", "wall s")
    lines = [
        f"digits, FCN, r = 0.9, Bayes-gated, {args.epochs} epochs, Adam lr 1e-3, batch 64; "
        f"mean over seeds {' '.join(map(str, args.seeds))}. {info['date']}, {info['cpu']}, "
        f"{info['torch_threads']} torch thread, torch {info['torch']}; total {total:.0f} s.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for mode in args.modes:
        for opt, val, _ in configs:
            rs = [r for r in runs if r["mode"] == mode and r["option"] == opt and r["value"] == val]
            accs = [100 * r["test_acc"] for r in rs]
            sd = f" ± {statistics.stdev(accs):.1f}" if len(accs) > 1 else ""
            cells = (mode, opt, val, f"{mean(accs):.1f}{sd}", f"{100 * mean([r['sparsity'] for r in rs]):.1f}",
                     f"{mean([r['prune_events'] for r in rs]):.1f}", f"{mean([r['first_prune_log_bf'] for r in rs]):.4g}",
                     f"{mean([r['final_log_bf'] for r in rs]):.4g}", f"{mean([r['dead'] for r in rs]):.1f}",
                     f"{mean([r['removed'] for r in rs]):.1f}",
                     f"{mean([r['params_after'] for r in rs]):.0f} / {mean([r['params_before'] for r in rs]):.0f}",
                     f"{mean([r['wall_s'] for r in rs]):.1f}")
            lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out.with_suffix(".md").write_text(text)
    print()
    print(text)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
