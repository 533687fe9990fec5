"""Command line: ``bayesprune run | sweep | table | plot | bf-run`` (see ``docs/cli.md``).

Every error the user can fix is one line ``error: ...`` naming the option or file, never a
traceback; the exit codes (docs/cli.md's error table): 2 bad option, value, data file, checkpoint
or a run directory holding another configuration; 1 training diverged (the message says which
checkpoint exists), a download failed, or some runs of a sweep/reproduction failed; 3 the run
directory is in use by another process; 4 an operating-system error on a file (not a
directory, permission, disk full); 5 out of memory; 130 Ctrl-C (the same command resumes).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Sequence

from .rundir import read_json, write_text

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
EXIT_DIVERGED = 1
EXIT_LOCKED = 3
EXIT_OS = 4
EXIT_MEMORY = 5
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """An error printed as ``error: <message>`` with exit code 2."""


# ---------------------------------------------------------------------------------------------
# helpers
def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(header)]
    print("  ".join(str(h).rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).rjust(w) for c, w in zip(r, widths)))


def _pct(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _threshold(text: str) -> float:
    from ..reduction import REFERENCE_THRESHOLD

    if text == "reference":
        return REFERENCE_THRESHOLD
    try:
        return _finite(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a finite number or 'reference', got {text!r}") from None


def _prior_odds(text: str) -> float:
    value = _finite(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"prior odds must be > 0, got {text!r}")
    return value


def _config_overrides(args: argparse.Namespace) -> dict:
    """RunConfig fields given on the command line (None = take resolve_config's default)."""
    return dict(
        dataset=args.dataset,
        model=args.model,
        method=getattr(args, "method", None),
        data_dir=args.data_dir,
        epochs=args.epochs,
        finetune_epochs=getattr(args, "finetune_epochs", None),
        batch_size=args.batch_size,
        lr=args.lr,
        noise_lr=args.noise_lr,
        width=args.width,
        extra_layers=args.extra_layers,
        kl_weighting=args.kl_weighting,
        kl_scale=args.kl_scale,
        sharing=args.sharing,
        precision=args.precision,
        threshold=getattr(args, "threshold", None),
        prior_odds=getattr(args, "prior_odds", None),
        compression=getattr(args, "compression", None),
        monotone=False if getattr(args, "no_monotone", False) else None,
        round_to=getattr(args, "round_to", None),
        shrink=True if getattr(args, "shrink", False) else None,
        device=args.device,
        val_fraction=args.val_fraction,
        image_size=getattr(args, "image_size", None),
        dense_finetune_epochs=getattr(args, "dense_finetune_epochs", None),
        dense_finetune_lr=getattr(args, "dense_finetune_lr", None),
        dense_finetune_schedule=getattr(args, "dense_finetune_schedule", None),
    )


# ---------------------------------------------------------------------------------------------
# parser
def _add_common(p: argparse.ArgumentParser, methods: bool = True) -> None:
    from ..criteria import BMRSNormal
    from .data import DATASETS
    from ..noise import DEFAULT_SHARING, KL_WEIGHTINGS, SHARING
    from .training import METHODS

    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", choices=DATASETS, default=None, help="data set (default: digits, offline)")
    g.add_argument("--model", default=None, help="mlp, lenet5, lenet5-caffe, resnet18-cifar, fcn, cnn, resnet50, vit-b16, vit-small or tv:<torchvision name> (default: mlp, or lenet5 with a data set other than digits)")
    g.add_argument("--data-dir", default=None, help="folder holding the data files (default: $BAYESPRUNE_DATA_DIR or ~/.cache/bayesprune/data)")
    g.add_argument("--download", action="store_true", help="download the data set first if its files are missing")
    g.add_argument("--out-dir", default="runs", help="root of the run directories (default: runs)")
    g.add_argument("--width", type=int, default=None, help="MLP hidden width")
    g.add_argument("--extra-layers", type=int, default=None, help="MLP extra hidden layers")
    g = p.add_argument_group("training (defaults: the paper's table for model/data set)")
    if methods:
        g.add_argument("--method", choices=METHODS, default=None, help="pruning method (default: bmrs_n)")
    g.add_argument("--epochs", type=int, default=None)
    if methods:
        g.add_argument("--finetune-epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=_finite, default=None)
    g.add_argument("--noise-lr", type=_finite, default=None,
                   help="learning rate of the noise parameters (default: 0.05, or --lr with a data set other than digits)")
    g.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    g.add_argument("--kl-weighting", choices=KL_WEIGHTINGS, default=None)
    g.add_argument("--kl-scale", type=_finite, default=None, metavar="BETA",
                   help="multiply the KL term by BETA: loss = CE + BETA x KL, e.g. with --kl-weighting elbo (default 1)")
    g.add_argument("--sharing", choices=SHARING, default=None,
                   help=f"noise draws: per (example, channel), per element (the reference code's) or per channel (default: {DEFAULT_SHARING})")
    g.add_argument("--precision", type=_finite, default=None, help="BMRS_U precision p (default 8)")
    g.add_argument("--val-fraction", type=_finite, default=None, help="validation share of the training set (default 0.2)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize the images to this side; 28 keeps MNIST's and Fashion-MNIST's own images "
                        "(lenet5-caffe's setting); unset, the data set's side (32, TinyImageNet 64)")
    if methods:
        default = BMRSNormal()
        g.add_argument("--threshold", type=_threshold, default=None,
                       help="prune threshold of the criterion (BMRS: in dF, = -log prior odds); "
                            f"'reference' = the paper's BMRS_N (dF >= {default.threshold:.3f})")
        g.add_argument("--prior-odds", type=_prior_odds, default=None,
                       help=f"BMRS prior odds of removal: removed when dF + log(odds) >= 0 (default for bmrs_n: "
                            f"{default.prior_odds:.4g} = sqrt(2 pi), the paper's; 1 = exact BMR, bmrs_u's default)")
        g.add_argument("--compression", type=_finite, default=None, help="target parameter compression in [0, 1] (l2, grad)")
        g.add_argument("--no-monotone", action="store_true", help="allow pruned structures to come back")
        g.add_argument("--round-to", type=_positive_int, default=None,
                       help="each layer keeps a multiple of this many structures, the extra ones those of highest "
                            "keep score (kernel-friendly widths); off unless given")
        g.add_argument("--shrink", action="store_true", help="physically remove pruned structures during training")
        _add_dense_finetune(g)
    g.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_dense_finetune(g) -> None:
    from .finetune import SCHEDULES

    g.add_argument("--dense-finetune-epochs", type=_epochs_at_least_0, default=None,
                   help="after pruning: shrink (fold E[θ], remove the pruned structures) and fine-tune the small plain "
                        "network this many epochs with cross-entropy only (default 0, off)")
    g.add_argument("--dense-finetune-lr", type=_finite, default=None,
                   help="Adam learning rate of the dense fine-tune (unset: the run's --lr)")
    g.add_argument("--dense-finetune-schedule", choices=SCHEDULES, default=None,
                   help=f"learning-rate schedule of the dense fine-tune over its epochs (default {SCHEDULES[0]})")


def _epochs_at_least_0(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of epochs, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: off), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from ..bayes_factor import SKIP_POLICIES
    from .data import DATASETS
    from ..noise import KL_WEIGHTINGS, SHARING

    p = argparse.ArgumentParser(prog="bayesprune", description="Bayesian structured pruning (BMRS) and Bayes-factor pruning.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="continuous pruning runs (one per seed), the BMRS paper's Table 1 protocol",
                       description="Continuous pruning, one run directory per seed: "
                       "<out-dir>/<model>-<dataset>-<method>[-p<precision>]/seed<k>. Re-running resumes.")
    _add_common(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("sweep", help="post-training pruning curves per criterion (one per seed) and a plot",
                       description="Train without pruning, then sweep the compression for each criterion; "
                       "writes <out-dir>/<model>-<dataset>-sweep/seed<k>/sweep.json and accuracy_vs_compression.png.")
    _add_common(s, methods=False)
    s.add_argument("--criteria", nargs="+", default=None, help="criteria (default: l2 snr etheta bmrs_n bmrs_u)")
    s.add_argument("--points", type=_finite, nargs="+", default=None, help="target compressions in [0, 1]")
    s.add_argument("--sweep-finetune-epochs", type=int, default=None, help="fine-tune epochs at each point (default 1)")
    _add_engine(s)
    s.set_defaults(func=cmd_sweep)

    t = sub.add_parser("table", help="aggregate run directories into the papers' Table 1 (Markdown + CSV)")
    t.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="directories searched recursively for summary.json")
    t.add_argument("--out", default=None, metavar="PREFIX", help="write PREFIX.md, PREFIX.csv (and PREFIX-bf.md/.csv for bf-run results)")
    t.set_defaults(func=cmd_table)

    pl = sub.add_parser("plot", help="E[θ]/dF histograms and Spearman correlations of criteria for a trained run")
    pl.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (config.json + checkpoint.pt), or a sweep seed directory")
    pl.add_argument("--out", default=None, help="output folder (default: RUN_DIR)")
    pl.add_argument("--data-dir", default=None, help="override the data folder recorded in the run's config")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bf-run", help="Bayes-factor pruning runs (random/magnitude, Bayes-gated or plain)",
                       description="One run directory per (mode, gating, sparsity, seed) under "
                       "<out-dir>/bf-<model>-<dataset>/; runs whose summary.json exists are skipped, interrupted ones "
                       "resume after the last epoch of their checkpoint.pt.")
    b.add_argument("--dataset", choices=DATASETS, default="digits")
    b.add_argument("--model", choices=("fcn", "cnn"), default="fcn")
    b.add_argument("--data-dir", default=None)
    b.add_argument("--download", action="store_true", help="download the data set first if its files are missing")
    b.add_argument("--out-dir", default="runs")
    b.add_argument("--mode", nargs="+", choices=("none", "random", "magnitude"), default=["random"],
                   help="pruning modes; 'none' is the unpruned baseline (default: random)")
    b.add_argument("--sparsity", type=_finite, nargs="+", default=[0.5], help="target sparsities r in [0, 1)")
    b.add_argument("--gated", action=argparse.BooleanOptionalAction, default=True,
                   help="Bayes-factor gate (--gated, default) or the plain baseline pruning every epoch (--no-gated)")
    b.add_argument("--beta", type=_finite, default=1.0, help="Bayes-factor threshold (default 1)")
    b.add_argument("--prior-std", type=_finite, default=1.0)
    b.add_argument("--prior-mean", type=_finite, default=0.0)
    b.add_argument("--first-log-bf", type=float, default=math.inf, help="log BF before any pruning (default inf: prune first)")
    b.add_argument("--likelihood-batches", type=int, default=None, help="use a fixed subset of k batches for log p(D|w) (default: whole training set)")
    b.add_argument("--steps", type=int, default=1, help="pruning events to ramp up to r (default 1)")
    b.add_argument("--spare-output", action="store_true",
                   help="leave the output layer unpruned (default: every Linear/Conv layer is pruned to r, "
                        "as the paper's Algorithm 2 reads; at r = 0.99 that leaves whole classes without weights)")
    b.add_argument("--on-skip", choices=SKIP_POLICIES, default="unit")
    b.add_argument("--epochs", type=int, default=25)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--lr", type=_finite, default=1e-3)
    b.add_argument("--seeds", type=int, nargs="+", default=[0])
    b.add_argument("--device", default="auto")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bf_run)

    from .reproduce import ENSEMBLE_AUTO, TARGETS

    def _ensemble(text: str):
        if text == ENSEMBLE_AUTO:
            return text
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected {ENSEMBLE_AUTO!r} or an integer >= 1 (1: single runs), got {text!r}")
        return value

    rp = sub.add_parser("reproduce", help="run (or resume) every run of one of the papers' tables, then print it",
                        description="bmrs-table1: MLP/LeNet5 x MNIST/Fashion-MNIST/CIFAR-10 x None, L2, E[θ], SNR, "
                        "BMRS_N, BMRS_U-8, BMRS_U-4; bmrs-table2: ResNet-50/ViT-B/16 x CIFAR-10/TinyImageNet, the same rows; "
                        "bmrs-posttrain: post-training sweeps; bf-table1: the Bayes-factor "
                        "paper's Table 1. Finished runs are skipped, interrupted ones resume.")
    rp.add_argument("name", choices=TARGETS)
    rp.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    rp.add_argument("--epochs", type=int, default=None, help="training epochs (default: the paper's)")
    rp.add_argument("--finetune-epochs", type=int, default=None,
                    help="fine-tuning epochs (default: the paper's 10, or min(10, --epochs) when --epochs is given)")
    rp.add_argument("--data-dir", default=None, help="folder holding mnist/, fashion-mnist/, cifar10 data")
    rp.add_argument("--out-dir", default="runs/reproduce")
    rp.add_argument("--models", nargs="+", default=None, help="subset of models (default: all of the table)")
    rp.add_argument("--datasets", nargs="+", default=None, help="subset of data sets (default: all of the table)")
    rp.add_argument("--jobs", type=int, default=None,
                    help="runs in parallel, each with cores/jobs threads (default: one per core on the CPU, "
                         "measured ~1.9x faster than one run with all threads; 1 on CUDA)")
    rp.add_argument("--ensemble", type=_ensemble, default=ENSEMBLE_AUTO, metavar="auto|K",
                    help="bmrs-table1/-table2, bf-table1: train runs that share a network (seeds, methods) as batched ensembles, "
                         "each member with its single run's numbers; auto (default): a timed probe of a few steps per "
                         "network decides, printed and recorded in each summary; 1: single runs; K: ensembles of up "
                         "to K (docs/scale-out.md)")
    rp.add_argument("--sharing", choices=SHARING, default=None, help="noise draws (default: channel)")
    rp.add_argument("--noise-lr", type=_finite, default=None, help="learning rate of the noise parameters (default: --lr)")
    rp.add_argument("--threshold", type=_threshold, default=None, help="BMRS_N/BMRS_U threshold (default 0; 'reference')")
    rp.add_argument("--kl-weighting", choices=KL_WEIGHTINGS, default=None, help="KL weighting (default: mean, the reference's)")
    rp.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    _add_dense_finetune(rp.add_argument_group("dense fine-tune after pruning (bmrs-table1)"))
    t2 = rp.add_argument_group("models and data (bmrs-table1, bmrs-table2, bmrs-posttrain)")
    t2.add_argument("--weights", default=None,
                    help="bmrs-table2: a state-dict file of pretrained weights for every model of the run (loaded with "
                         "torch.load(weights_only=True), the head replaced for the data set's classes; default: from scratch)")
    t2.add_argument("--image-size", type=_positive_int, default=None, help="resize the images to this side (default: the data set's, 32 or 64)")
    t2.add_argument("--train-subset", type=_positive_int, default=None, help="keep this many images of the official training set (default: all)")
    t2.add_argument("--test-subset", type=_positive_int, default=None, help="keep this many images of the test set (default: all)")
    t2.add_argument("--no-latency", action="store_true",
                    help="summaries give the shrunk network's parameters and MACs only, no CPU latency (saves a minute a run)")
    rp.add_argument("--quiet", action="store_true", help="no per-run progress lines")
    _add_engine(rp)
    rp.set_defaults(func=cmd_reproduce)
    return p


def _add_engine(p: argparse.ArgumentParser) -> None:
    from .engines import ENGINES

    g = p.add_argument_group("engine (docs/scale-out.md)")
    g.add_argument("--engine", choices=ENGINES, default="local",
                   help="local: processes of this machine (default); ray: one Ray task per run")
    g.add_argument("--ray-address", default=None,
                   help="--engine ray: the cluster to run on ('auto', <head>:6379, ray://<head>:10001; "
                        "default: a local Ray started for this command)")
    g.add_argument("--cpus-per-run", type=_finite, default=None, help="--engine ray: CPUs (and torch threads) of each run (default 1)")
    g.add_argument("--gpus-per-run", type=_finite, default=None,
                   help="--engine ray: GPUs of each run, a fraction below 1 shares a GPU (default 0)")


def _engine(args, jobs: int | None = 1):
    """The engine of ``--engine`` and its options (engines.make_engine)."""
    from .engines import make_engine

    if args.engine == "ray" and getattr(args, "jobs", None) is not None:
        raise CLIError("--jobs applies to --engine local; with --engine ray each run takes --cpus-per-run CPUs of the Ray cluster")
    try:
        return make_engine(args.engine, jobs=jobs or 1, address=args.ray_address, num_cpus_per_run=args.cpus_per_run,
                           num_gpus_per_run=args.gpus_per_run)
    except ImportError as e:
        raise CLIError(str(e)) from None


def _failed(failures) -> int:
    """1 after listing the runs that failed (with their errors) on stderr, else 0."""
    if not failures:
        return 0
    print(f"error: {len(failures)} run(s) failed (the others finished; run the same command again to retry them):", file=sys.stderr)
    for o in failures:
        print(f"  {getattr(o.config, 'out_dir', o.config)}: {o.error}", file=sys.stderr)
    return 1


def cmd_reproduce(args) -> int:
    from .reproduce import reproduce
    from .results import bf_table, find_summaries, table1, table_csv, table_markdown

    extra = {k: v for k, v in dict(sharing=args.sharing, noise_lr=args.noise_lr, threshold=args.threshold,
                                                  kl_weighting=args.kl_weighting, device=args.device).items() if v is not None}
    dense = {k: v for k, v in dict(dense_finetune_epochs=args.dense_finetune_epochs, dense_finetune_lr=args.dense_finetune_lr,
                                   dense_finetune_schedule=args.dense_finetune_schedule).items() if v is not None}
    if dense and args.name != "bmrs-table1":
        raise CLIError(f"--dense-finetune-* apply to bmrs-table1, not {args.name}")
    extra.update(dense)
    data = {k: v for k, v in dict(weights=args.weights, image_size=args.image_size, train_subset=args.train_subset,
                                  test_subset=args.test_subset, measure_latency=False if args.no_latency else None).items() if v is not None}
    if data and args.name == "bf-table1":
        raise CLIError(f"--{'/--'.join(k.replace('_', '-') for k in data)} apply to the BMRS targets, not bf-table1")
    if args.weights is not None and not Path(args.weights).is_file():
        raise CLIError(f"--weights {args.weights}: no such file")
    extra.update(data)
    out = Path(args.out_dir) / args.name
    jobs = args.jobs
    if jobs is None and args.engine == "local":
        from .reproduce import usable_cores
        from .training import _device

        jobs = 1 if _device(args.device or "auto").type == "cuda" else usable_cores()
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    engine = _engine(args, jobs)
    res = reproduce(args.name, out, seeds=args.seeds, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                    data_dir=args.data_dir, jobs=jobs, models=args.models, datasets=args.datasets,
                    progress=not args.quiet, engine=engine, ensemble=args.ensemble, **extra)
    summaries = [s for _, s in find_summaries([out])]
    print()
    if args.name == "bf-table1":
        table, header = bf_table(summaries), "r"
    elif args.name == "bmrs-table1":
        table, header = table1(summaries), "method"
    elif args.name == "bmrs-table2":
        from .reproduce import table2

        table, header = table2(summaries), "method"
    else:
        return _print_sweeps(out, res["wall_time_s"]) or _failed(res.get("failures"))
    md = table_markdown(table, row_header=header)
    print(md)
    _write_pair(str(out / "table"), md, table_csv(table, row_header=header))
    print(f"wall time {res['wall_time_s']:.0f} s; table written to {out / 'table.md'} and {out / 'table.csv'}")
    return _failed(res.get("failures"))


# ---------------------------------------------------------------------------------------------
# run
def _maybe_download(args, dataset: str) -> None:
    if getattr(args, "download", False) and dataset != "digits":
        from .data import download

        print(f"checking/downloading {dataset} into {args.data_dir or 'the default data folder'}", flush=True)
        download(dataset, args.data_dir)


def _resolved(args, **extra):
    from .training import resolve_config

    over = _config_overrides(args)
    over.update(extra)
    return resolve_config(**over)


def cmd_run(args) -> int:
    """``bayesprune run``; under torchrun every process trains the run together (distributed.py)
    and only rank 0 prints and writes."""
    import torch.distributed as dist

    from . import distributed

    created = distributed.init_from_env(args.device or "auto")
    try:
        with distributed.quiet_unless_writer(distributed.context()):
            return _cmd_run(args)
    finally:
        if created:
            dist.destroy_process_group()


def _cmd_run(args) -> int:
    from .training import criterion_of, run_continuous, run_dir_name

    base = _resolved(args, seed=args.seeds[0])
    group = Path(args.out_dir) / run_dir_name(base.model, base.dataset, base.method, base.precision, base.threshold, base.prior_odds,
                                             base.kl_weighting, base.kl_scale)
    print(f"{base.method} on {base.model}/{base.dataset}: epochs {base.epochs} + fine-tune {base.finetune_epochs}, "
          f"batch {base.batch_size}, lr {base.lr:g}, seeds {' '.join(map(str, args.seeds))} -> {group}", flush=True)
    _maybe_download(args, base.dataset)
    rows, notes = [], []
    for seed in args.seeds:
        cfg = _resolved(args, seed=seed, out_dir=str(group / f"seed{seed}"))
        _current["run_dir"] = cfg.out_dir
        s = run_continuous(cfg, progress=not args.quiet)
        rows.append((str(seed), _pct(s["test_acc"]), _pct(s["param_compression"]), _pct(s["structure_compression"]),
                     f"{s['wall_time_s']:.1f}", cfg.out_dir))
        if s.get("kind") == "dense_finetune":
            p, macs = s["pruned"], s["size_speed"]["macs"]
            notes.append(f"seed {seed}: dense fine-tune {cfg.dense_finetune_epochs} epochs (cross-entropy only, no noise) "
                         f"of the shrunk network: test acc {_pct(p['test_acc'])} % after pruning -> {_pct(s['test_acc'])} %; "
                         f"{s['params_kept']:,} of {s['params_dense']:,} parameters, MACs {macs['ratio']:.2f}x fewer")
        if "reference_offset" in s:
            ref = s["reference_offset"]
            notes.append(f"seed {seed}: the reference implementation's BMRS_N threshold (dF >= {ref['threshold']:.3f}) "
                         f"would remove {_pct(ref['param_compression'])} % of the parameters of this final model "
                         "(docs/maths.md: posteriors relaxed to the prior have dF just below 0)")
    print()
    _print_table(("seed", "test acc %", "param compression %", "structure compression %", "wall s", "run dir"), rows)
    rule = criterion_of(base)
    if base.compression is not None:
        print(f"rule: {base.method}, lowest scores removed first to {100 * base.compression:g} % of the parameters")
    else:
        print(f"rule: {rule.rule if rule is not None else 'no pruning (' + base.method + ')'}")
    for line in notes:
        print(line)
    if len(rows) > 1:
        from .results import mean_std

        acc = mean_std(float(r[1]) for r in rows)
        comp = mean_std(float(r[2]) for r in rows)
        print(f"mean ± std over {acc[2]} seeds: test acc {acc[0]:.2f} ± {acc[1]:.2f} %, "
              f"param compression {comp[0]:.2f} ± {comp[1]:.2f} %")
    return 0


def _print_sweeps(out: Path, wall_time_s: float) -> int:
    """Print (and write to table.md beside them, with the plot) the curves and stop points of
    every ``<model>-<dataset>-sweep`` group under ``out``."""
    from .results import load_sweeps, plot_sweep, sweep_markdown, sweep_title

    parts = []
    for group in sorted(out.glob("*-sweep")):
        sweeps = load_sweeps(group)
        if not sweeps:
            continue
        title = sweep_title(sweeps)
        png = plot_sweep(sweeps, group / "accuracy_vs_compression.png", title=title)
        parts.append(f"## {title}\n\n{sweep_markdown(sweeps)}\nplot: {png}\n")
    md = "\n".join(parts)
    print(md)
    write_text(out / "table.md", md)
    print(f"wall time {wall_time_s:.0f} s; table written to {out / 'table.md'}")
    return 0


# ---------------------------------------------------------------------------------------------
# sweep
def cmd_sweep(args) -> int:
    from .results import plot_sweep
    from .training import run_sweep

    extra = {}
    if args.criteria is not None:
        from ..criteria import CRITERIA

        bad = [c for c in args.criteria if c not in CRITERIA or c == "grad"]
        if bad:
            raise CLIError(f"unknown sweep criterion {', '.join(bad)}; valid: {', '.join(c for c in CRITERIA if c != 'grad')}")
        extra["sweep_criteria"] = list(args.criteria)
    if args.points is not None:
        bad = [x for x in args.points if not 0 <= x <= 1]
        if bad:
            raise CLIError(f"--points must lie in [0, 1], got {bad}")
        extra["sweep_points"] = sorted(args.points)
    if args.sweep_finetune_epochs is not None:
        extra["sweep_finetune_epochs"] = args.sweep_finetune_epochs
    base = _resolved(args, seed=args.seeds[0], **extra)
    from .training import run_dir_name

    group = Path(args.out_dir) / run_dir_name(base.model, base.dataset, "sweep", kl_weighting=base.kl_weighting, kl_scale=base.kl_scale)
    print(f"sweep on {base.model}/{base.dataset}: train {base.epochs} epochs, criteria {' '.join(base.sweep_criteria)}, "
          f"{len(base.sweep_points)} points, seeds {' '.join(map(str, args.seeds))} -> {group}", flush=True)
    _maybe_download(args, base.dataset)
    from functools import partial

    from .engines import run_all

    engine = _engine(args)
    cfgs = [_resolved(args, seed=seed, out_dir=str(group / f"seed{seed}"), **extra) for seed in args.seeds]
    _current["run_dir"] = str(group)
    failures = []
    bars = not args.quiet and args.engine == "local"  # run in this process: its progress bars
    sweeps = [s for s in run_all(engine, partial(run_sweep, progress=bars), cfgs, progress=not args.quiet,
                                 failures=failures) if s is not None]
    if not sweeps:
        return _failed(failures)
    rows = []
    from .results import aggregate_sweeps

    agg = aggregate_sweeps(sweeps)
    for c, pts in agg["curves"].items():
        for t, comp, acc, sd, n in pts:
            rows.append((c, f"{100 * t:g}", f"{comp:.2f}", f"{acc:.2f} ± {sd:.2f}", str(n)))
    for c, (comp, acc, n) in agg["stops"].items():
        rows.append((f"{c} stop", "-", f"{comp:.2f}", f"{acc:.2f}", str(n)))
    print()
    _print_table(("criterion", "target %", "param compression %", "test acc %", "n"), rows)
    png = plot_sweep(sweeps, group / "accuracy_vs_compression.png", title=f"{base.model} / {base.dataset}")
    print(f"plot: {png}")
    return _failed(failures)


# ---------------------------------------------------------------------------------------------
# table
def cmd_table(args) -> int:
    from .results import bf_table, find_summaries, table1, table_csv, table_markdown

    try:
        found = find_summaries(args.run_dirs)
    except FileNotFoundError as e:
        raise CLIError(str(e)) from e
    if not found:
        raise CLIError(f"no summary.json found under {', '.join(args.run_dirs)}")
    summaries = [s for _, s in found]
    t1, tb = table1(summaries), bf_table(summaries)
    outputs = []
    if t1.rows:
        md, csv_text = table_markdown(t1, "method"), table_csv(t1, "method")
        print(md)
        if args.out:
            outputs += _write_pair(args.out, md, csv_text)
    if tb.rows:
        md, csv_text = table_markdown(tb, "sparsity r"), table_csv(tb, "sparsity")
        print(md)
        if args.out:
            outputs += _write_pair(args.out + ("-bf" if t1.rows else ""), md, csv_text)
    if not t1.rows and not tb.rows:
        raise CLIError("the summaries found are neither continuous runs nor bf-run runs")
    for o in outputs:
        print(f"wrote {o}")
    return 0


def _write_pair(prefix: str, md: str, csv_text: str) -> list[Path]:
    p = Path(prefix)
    if p.parent != Path(""):
        p.parent.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = Path(f"{prefix}.md"), Path(f"{prefix}.csv")
    write_text(md_path, md)
    write_text(csv_path, csv_text)
    return [md_path, csv_path]


# ---------------------------------------------------------------------------------------------
# plot
def load_run_model(run_dir: str | Path, data_dir: str | None = None):
    """(model, config, splits, example) of a run directory with its final checkpoint loaded."""
    import dataclasses

    import torch

    from .training import CheckpointError, RunConfig, RunDir, _build, _rebuild_shrunk, load_splits

    rd = Path(run_dir)
    ckpts = ("checkpoint.pt", "checkpoint.prev.pt")
    if not any((rd / c).exists() for c in ckpts) and any((rd / "train" / c).exists() for c in ckpts):
        rd = rd / "train"  # a sweep directory: its trained network
    cfg_path = rd / "config.json"
    if not cfg_path.exists():
        raise CLIError(f"{cfg_path} does not exist: not a run directory")
    run = RunDir(rd)
    if not run.has_training():
        raise CLIError(f"{rd} holds no checkpoint.pt: the run has not finished an epoch")
    raw = read_json(cfg_path)
    known = {f.name for f in dataclasses.fields(RunConfig)}
    try:
        cfg = RunConfig(**{k: v for k, v in raw.items() if k in known})
    except TypeError as e:
        raise CLIError(f"{cfg_path} is not a run configuration ({e})") from None
    cfg.device = "cpu"
    if data_dir is not None:
        cfg.data_dir = data_dir
    splits = load_splits(cfg)
    torch.manual_seed(cfg.seed)
    model, example = _build(cfg, splits, torch.device("cpu"))
    state = run.load()
    if state is None:
        raise CLIError(f"{rd} holds no checkpoint.pt: the run has not finished an epoch")
    try:
        if state.get("kept_index") is not None:
            model = _rebuild_shrunk(model, example, state["kept_index"])
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run.loaded_from} does not fit the model of {cfg_path} "
                              f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.eval()
    return model, cfg, rd


def _rule_text(cfg) -> str:
    """The rule a run pruned by, in words (criteria.Criterion.rule, or its target compression)."""
    from .training import criterion_of

    if cfg.compression is not None:
        return f"{cfg.method}, lowest scores removed first to {100 * cfg.compression:g} % of the parameters"
    rule = criterion_of(cfg)
    return rule.rule if rule is not None else f"no pruning ({cfg.method})"


def _panel_thresholds(cfg) -> dict[str, float]:
    """dF threshold of the BMRS_N and BMRS_U histogram panels: the run's own where it used that
    criterion with a threshold, else the criterion's default rule."""
    from ..criteria import get_criterion
    from .training import criterion_of

    out = {}
    for name in ("bmrs_n", "bmrs_u"):
        own = cfg.method == name and cfg.compression is None
        out[name] = float((criterion_of(cfg) if own else get_criterion(name)).threshold)
    return out


def cmd_plot(args) -> int:
    from .results import (
        criterion_scores,
        matrix_csv,
        matrix_markdown,
        plot_spearman,
        plot_structure_histograms,
        spearman_matrix,
        structure_stats,
    )

    model, cfg, rd = load_run_model(args.run_dir, args.data_dir)
    if cfg.method == "dense":
        raise CLIError(f"{args.run_dir} is a 'dense' run (no noise layers): it has no E[θ] or dF to plot")
    out = Path(args.out) if args.out else Path(args.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats = structure_stats(model, precision=cfg.precision)
    kept = stats["kept"].astype(bool)
    title = f"{cfg.method} {cfg.model}/{cfg.dataset} seed {cfg.seed}"
    thr = _panel_thresholds(cfg)
    h = plot_structure_histograms(stats, out / "structure_histograms.png", precision=cfg.precision,
                                  title=f"{title}; rule: {_rule_text(cfg)}", threshold_n=thr["bmrs_n"], threshold_u=thr["bmrs_u"])
    print(f"{title}: {int(kept.sum())} of {kept.size} structures kept (rule: {_rule_text(cfg)}; "
          f"dF_N >= {thr['bmrs_n']:.3g}: {int((stats['df_n'] >= thr['bmrs_n']).sum())}, "
          f"dF_U-{cfg.precision:g} >= {thr['bmrs_u']:.3g}: {int((stats['df_u'] >= thr['bmrs_u']).sum())})")
    labels, m = spearman_matrix(criterion_scores(model))
    print(f"\nSpearman rank correlation of the keep scores over all {kept.size} structures:\n")
    print(matrix_markdown(labels, m))
    write_text(out / "spearman.csv", matrix_csv(labels, m))
    hm = plot_spearman(labels, m, out / "spearman.png", title=f"Spearman rank correlation, {title}")
    print(f"wrote {h}\nwrote {out / 'spearman.csv'}\nwrote {hm}")
    return 0


# ---------------------------------------------------------------------------------------------
# bf-run
def cmd_bf_run(args) -> int:
    from dataclasses import fields

    from .bf_training import BayesFactorRunConfig, bayes_factor_grid, bf_run_dir, run_bayes_factor

    options = {f.name: getattr(args, f.name) for f in fields(BayesFactorRunConfig)
               if f.name not in ("mode", "sparsity", "seed")}
    configs = bayes_factor_grid(modes=args.mode, sparsities=args.sparsity, seeds=args.seeds, **options)
    root = bf_run_dir(configs[0]).parent.parent
    print(f"bf-run {args.model}/{args.dataset}: {len(configs)} runs ({'Bayes-gated' if args.gated else 'plain'}), "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g} -> {root}", flush=True)
    _maybe_download(args, args.dataset)
    rows, cache = [], {}
    for cfg in configs:
        _current["run_dir"] = str(bf_run_dir(cfg))
        s = run_bayes_factor(cfg, data_cache=cache)
        rows.append((s["mode"], "-" if s["mode"] == "none" else ("bayes" if s["gated"] else "plain"),
                     "-" if s["mode"] == "none" else f"{s['sparsity']:g}", str(s["seed"]), _pct(s["test_acc"]),
                     _pct(s["final_sparsity"]), str(s["prune_events"]), f"{s['dead_structures']}/{s['structures']}",
                     f"{s['wall_time_s']:.1f}"))
    print()
    _print_table(("mode", "gate", "r", "seed", "test acc %", "sparsity %", "prune events", "dead structures", "wall s"), rows)
    print(f"run directories (summary.json, history.json, curves.png) under {root}")
    return 0


# ---------------------------------------------------------------------------------------------
_current: dict[str, str | None] = {"run_dir": None}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesprune`` console script; returns the exit code (module docstring)."""
    _current["run_dir"] = None
    try:
        return _main(argv)
    except KeyboardInterrupt:
        where = f" (run directory {_current['run_dir']})" if _current["run_dir"] else ""
        print(f"\ninterrupted{where}; run the same command again to resume from the last finished "
              f"epoch", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    from .data import DataError, DataNotFoundError, DownloadError
    from .rundir import RunLockedError
    from .training import TrainingDiverged

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help")):
        argv = ["run", *argv]  # the offline default: digits + lenet5 + bmrs_n
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage + "error: ..." (code 2) or help (0)
        return int(e.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        _check_args(args)
        return int(args.func(args) or 0)
    except TrainingDiverged as e:
        print(f"error: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except RunLockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except DownloadError as e:
        print(f"error: download failed: {e}", file=sys.stderr)
        return 1
    except (CLIError, DataError, DataNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"error: {_os_error(e)}", file=sys.stderr)
        return EXIT_OS
    except (MemoryError, RuntimeError) as e:
        if not _is_allocation_failure(e):
            raise
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: out of memory ({first}); the model or batch is too large for this machine: lower --width, "
              "--batch-size or use another --device", file=sys.stderr)
        return EXIT_MEMORY


def _check_args(args) -> None:
    """Combinations argparse cannot see: duplicate seeds, a precision for a rule that has none,
    a command other than ``run`` under torchrun."""
    from .distributed import launched_by_torchrun

    if args.command != "run" and launched_by_torchrun():
        raise CLIError(f"bayesprune {args.command} does not run under torchrun (WORLD_SIZE > 1): only bayesprune run "
                       "trains one model on several processes; for many runs use --engine ray or --jobs")
    seeds = getattr(args, "seeds", None) or []
    twice = sorted({s for s in seeds if seeds.count(s) > 1})
    if twice:
        raise CLIError(f"--seeds lists {', '.join(map(str, twice))} more than once: each seed is one run, "
                       "and a repeated one would count twice in the mean")
    if getattr(args, "precision", None) is not None and args.command in ("run", "sweep"):
        uses = (args.method == "bmrs_u") if args.command == "run" else ("bmrs_u" in (args.criteria or ["bmrs_u"]))
        if not uses:
            what = f"--method {args.method or 'bmrs_n'}" if args.command == "run" else "the --criteria given"
            raise CLIError(f"--precision is the precision of BMRS_U (--method bmrs_u); {what} has no precision")


_OS_ADVICE = {
    "ENOSPC": "no space left on the device: free some space and run the same command again (a run resumes from "
              "its last checkpoint)",
    "EDQUOT": "disk quota exceeded: free some space and run the same command again",
    "EACCES": "permission denied: choose a writable --out-dir (or fix the permissions)",
    "EPERM": "operation not permitted: choose a writable --out-dir (or fix the permissions)",
    "EROFS": "read-only file system: choose another --out-dir",
    "ENOTDIR": "not a directory (a file is in the way): choose another --out-dir or move the file",
    "EEXIST": "exists and is not a directory: choose another --out-dir or move the file",
    "EISDIR": "is a directory where a file was expected",
    "ENOENT": "does not exist",
}


def _os_error(e: OSError) -> str:
    """``<file>: <what happened and what to do>`` of an operating-system error."""
    import errno

    name = errno.errorcode.get(e.errno or -1, "")
    what = _OS_ADVICE.get(name, e.strerror or str(e))
    where = e.filename if e.filename is not None else "file system"
    return f"{where}: {what}" + (f" ({name})" if name else "")


def _is_allocation_failure(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return ("can't allocate memory" in text or "out of memory" in text.lower()
            or type(e).__name__ == "OutOfMemoryError")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
