"""One command per table of the two papers (``bayesprune reproduce <name>``).

* ``bmrs-table1``: MLP and LeNet5 x MNIST, Fashion-MNIST, CIFAR-10 x None, L2, E[theta], SNR,
  BMRS_N, BMRS_U-8, BMRS_U-4 (continuous pruning, paper hyperparameters).  L2 runs second, at
  the compression BMRS_N reached with the same seed, as in the paper.
* ``bmrs-table2``: ResNet-50 and ViT-B/16 x CIFAR-10, TinyImageNet x the same rows, BMRS_N with
  both rules (prior odds 1 and the reference's sqrt(2 pi)), the paper's Table 2 hyperparameters
  (``training.PAPER_TABLE2``); pretrained weights from a file (``weights=``), else from scratch.
* ``bmrs-posttrain``: post-training sweeps with the BMRS stop points.
* ``bf-table1``: the Bayes-factor paper's Table 1 (FCN and CNN x data sets x r x four methods +
  unpruned).

Runs already finished are skipped, interrupted ones resume (their run directories are durable).
The runs execute on an engine (engines.py): by default ``jobs`` local processes, each with
``usable_cores() // jobs`` threads, or Ray tasks (docs/scale-out.md).  A run that fails is
reported with its error (``"failures"`` of the result) and the others go on.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

from .engines import LocalEngine, RunOutcome, run_all, usable_cores  # noqa: F401  (usable_cores: the CLI's --jobs default)
from .training import RunConfig, resolve_config, run_continuous, run_dir_name, run_sweep

__all__ = ["TARGETS", "bmrs_table1_configs", "bmrs_table2_configs", "table2", "reproduce"]

TARGETS = ("bmrs-table1", "bmrs-table2", "bmrs-posttrain", "bf-table1")
BMRS_MODELS = ("mlp", "lenet5")
BMRS_DATASETS = ("mnist", "fashion-mnist", "cifar10")
#: (method, precision) rows of the BMRS Table 1, L2 excluded (it needs BMRS_N's compression);
#: "dense" (no noise layers) is ours: what the noise and KL cost the unpruned network
BMRS_METHODS = (("none", None), ("etheta", None), ("snr", None), ("bmrs_n", None), ("bmrs_u", 8.0), ("bmrs_u", 4.0), ("dense", None))


def bmrs_table1_configs(out, seeds, epochs=None, finetune_epochs=None, data_dir=None, models=BMRS_MODELS, datasets=BMRS_DATASETS, threshold=None, methods=BMRS_METHODS, **extra) -> list[RunConfig]:
    """The runs of the BMRS Table 1 except L2.  BMRS_N runs with the exact rule (prior odds 1) and, if
    ``threshold`` is given (e.g. the reference code's -0.919), once more with it."""
    cfgs = []
    methods = list(methods) + ([("bmrs_n", "thr")] if threshold is not None else [])
    for model in models:
        for dataset in datasets:
            for method, precision in methods:
                thr = threshold if precision == "thr" else None
                precision = None if precision == "thr" else precision
                name = run_dir_name(model, dataset, method, precision, thr)
                for seed in seeds:
                    cfgs.append(
                        resolve_config(
                            model=model, dataset=dataset, method=method, precision=precision, seed=seed,
                            epochs=epochs, finetune_epochs=finetune_epochs, data_dir=data_dir,
                            out_dir=str(Path(out) / name / f"seed{seed}"),
                            threshold=thr,
                            prior_odds=1.0 if method == "bmrs_n" and thr is None else None,
                            **(_without_dense_finetune(extra) if method == "dense" else extra),
                        )
                    )
    return cfgs


TABLE2_MODELS = ("resnet50", "vit-b16")
TABLE2_DATASETS = ("cifar10", "tinyimagenet")


def bmrs_table2_configs(out, seeds, epochs=None, finetune_epochs=None, data_dir=None, models=TABLE2_MODELS, datasets=TABLE2_DATASETS, **extra) -> list[RunConfig]:
    """The runs of the BMRS Table 2 except L2: Table 1's rows without the noise-free one, BMRS_N
    with both rules, the Table 2 hyperparameters (``extra`` may override batch_size and lr)."""
    from ..reduction import REFERENCE_THRESHOLD
    from .training import PAPER_TABLE2

    options = dict(batch_size=PAPER_TABLE2["batch_size"], lr=PAPER_TABLE2["lr"])
    options.update({k: v for k, v in extra.items() if v is not None})
    options.setdefault("threshold", REFERENCE_THRESHOLD)
    methods = tuple(m for m in BMRS_METHODS if m[0] != "dense")
    return bmrs_table1_configs(out, seeds, PAPER_TABLE2["epochs"] if epochs is None else epochs, finetune_epochs, data_dir,
                               models, datasets, methods=methods, **options)


def table2(summaries):
    """``results.table1`` of the Table 2 runs, each column saying which weights its runs started
    from: "(pretrained: <file name>)" or "(from scratch)"."""
    from .results import table1

    table = table1(summaries)
    weights: dict = {}
    for s in summaries:
        cfg = s.get("config") or {}
        w = cfg.get("weights")
        weights.setdefault((cfg.get("model", "?"), cfg.get("dataset", "?")), set()).add(Path(w).name if w else None)
    names = []
    for (m, d), name in zip(table.columns, table.column_names):
        used = weights.get((m, d), {None})
        label = ", ".join(sorted(f"pretrained: {w}" if w else "from scratch" for w in used))
        names.append(f"{name} ({label})")
    table.column_names = names
    return table


def _without_dense_finetune(options: dict) -> dict:
    """``options`` less the dense fine-tune's (the noise-free "dense" row has nothing to shrink)."""
    return {k: v for k, v in options.items() if not k.startswith("dense_finetune_")}


def _run_one(cfg: RunConfig) -> dict:
    return run_continuous(cfg, progress=False)


def _sweep_one(cfg: RunConfig) -> dict:
    return run_sweep(cfg, progress=False)


def _ensemble_one(cfgs: tuple) -> list:
    """The runs of one batched ensemble (ensemble.py): per member its summary or its error text."""
    from .ensemble import run_ensemble

    return [r if isinstance(r, dict) else f"{type(r).__name__}: {r}" for r in run_ensemble(list(cfgs))]


def ensemble_groups(cfgs, size: int) -> list[tuple]:
    """``cfgs`` in groups of at most ``size`` that share a network and its training
    (ensemble.SHARED_FIELDS) and do not shrink, in the order of their first member."""
    from .ensemble import SHARED_FIELDS

    keyed: dict = {}
    for i, cfg in enumerate(cfgs):
        d = asdict(cfg)
        key = ("alone", i) if cfg.shrink else tuple(repr(d[f]) for f in SHARED_FIELDS)
        keyed.setdefault(key, []).append(i)
    return [tuple(idx[j:j + size]) for idx in keyed.values() for j in range(0, len(idx), size)]


def _run_continuous_all(engine, cfgs, progress, failures, ensemble: int) -> list:
    """run_continuous on every config; with ``ensemble`` > 1, groups of up to that many runs that
    share a network train as one batched ensemble each (one engine task per group)."""
    if ensemble <= 1:
        return run_all(engine, _run_one, cfgs, progress=progress, failures=failures)
    groups = ensemble_groups(cfgs, ensemble)
    out = [None] * len(cfgs)
    for idx, res in zip(groups, run_all(engine, _ensemble_one, [tuple(cfgs[i] for i in g) for g in groups],
                                        progress=progress, failures=failures)):
        for i, r in zip(idx, res or [None] * len(idx)):
            if isinstance(r, str):
                failures.append(RunOutcome(i, cfgs[i], error=r))
                print(f"FAILED {cfgs[i].out_dir}: {r}", file=sys.stderr, flush=True)
            elif res is not None:
                out[i] = r
    return out


BF_MODELS = ("fcn", "cnn")
BF_SPARSITIES = ("0.25", "0.5", "0.75", "0.9", "0.99")


def _bf_group(group) -> list[dict]:
    """Every sparsity and seed of one (model, data set, gate), as ``bayesprune bf-run`` runs them;
    returns their summaries."""
    from .bf_training import bayes_factor_grid, run_bayes_factor

    model, dataset, gated, seeds, epochs, data_dir, out = group
    modes = ["random", "magnitude"] + ([] if gated else ["none"])
    options = dict(model=model, dataset=dataset, gated=gated, out_dir=str(out), quiet=True)
    if epochs is not None:
        options["epochs"] = int(epochs)
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    configs = bayes_factor_grid(modes=modes, sparsities=[float(r) for r in BF_SPARSITIES], seeds=seeds, **options)
    cache: dict = {}
    return [run_bayes_factor(cfg, data_cache=cache) for cfg in configs]


def reproduce(name: str, out: str | Path, seeds=(0,), epochs=None, finetune_epochs=None, data_dir=None, jobs: int = 1, models=None, datasets=None, progress: bool = True, engine=None, ensemble: int = 1, **extra) -> dict:
    """Run (or resume) every run of target ``name`` on ``engine`` (default ``LocalEngine(jobs)``);
    returns {"summaries": [...], "wall_time_s": ..., "failures": [RunOutcome of each failed run]}.
    ``ensemble`` > 1 (bmrs-table1, bmrs-table2): up to that many runs sharing a network train as
    one batched ensemble (ensemble.py; off by default; measured in docs/scale-out.md)."""
    if name not in TARGETS:
        raise ValueError(f"unknown reproduction {name!r}; valid: {', '.join(TARGETS)}")
    if not (isinstance(ensemble, int) and ensemble >= 1):
        raise ValueError(f"ensemble must be an integer >= 1 (1: off), got {ensemble!r}")
    if ensemble > 1 and name not in ("bmrs-table1", "bmrs-table2"):
        raise ValueError(f"ensemble applies to bmrs-table1 and bmrs-table2 (continuous runs), not {name}")
    engine = LocalEngine(jobs) if engine is None else engine
    t0 = time.time()
    with engine:  # one Ray for every stage of the target
        summaries, failures = _reproduce(name, out, seeds, epochs, finetune_epochs, data_dir, models, datasets, progress, engine, ensemble, **extra)
    return {"summaries": summaries, "wall_time_s": time.time() - t0, "failures": failures}


def _reproduce(name, out, seeds, epochs, finetune_epochs, data_dir, models, datasets, progress, engine, ensemble=1, **extra) -> tuple[list, list[RunOutcome]]:
    failures: list[RunOutcome] = []
    if epochs is not None and finetune_epochs is None:
        finetune_epochs = min(10, epochs)  # a short smoke run should not fine-tune 10 epochs
    out = Path(out)
    if name in ("bmrs-table1", "bmrs-table2"):
        if name == "bmrs-table1":
            cfgs = bmrs_table1_configs(out, seeds, epochs, finetune_epochs, data_dir, models or BMRS_MODELS, datasets or BMRS_DATASETS, **extra)
        else:
            cfgs = bmrs_table2_configs(out, seeds, epochs, finetune_epochs, data_dir, models or TABLE2_MODELS, datasets or TABLE2_DATASETS, **extra)
        summaries = _run_continuous_all(engine, cfgs, progress, failures, ensemble)
        # L2 at BMRS_N's compression, per (model, dataset, seed)
        l2 = []
        thresholded = {(c.model, c.dataset, c.seed) for c in cfgs if c.method == "bmrs_n" and c.threshold is not None}
        for cfg, s in zip(cfgs, summaries):
            key = (cfg.model, cfg.dataset, cfg.seed)
            if s is not None and cfg.method == "bmrs_n" and ((cfg.threshold is not None) == (key in thresholded)):
                d = asdict(cfg)
                d.update(method="l2", threshold=None, prior_odds=None, compression=float(s["param_compression"]), out_dir=str(out / run_dir_name(cfg.model, cfg.dataset, "l2") / f"seed{cfg.seed}"))
                l2.append(RunConfig(**d))
        summaries = [s for s in summaries + _run_continuous_all(engine, l2, progress, failures, ensemble) if s is not None]
    elif name == "bmrs-posttrain":
        cfgs = []
        for model in models or BMRS_MODELS:
            for dataset in datasets or BMRS_DATASETS:
                for seed in seeds:
                    extra.pop("threshold", None)
                    cfgs.append(resolve_config(model=model, dataset=dataset, method="none", seed=seed, epochs=epochs, finetune_epochs=0, data_dir=data_dir, out_dir=str(out / run_dir_name(model, dataset, "sweep") / f"seed{seed}"), **extra))
        summaries = [s for s in run_all(engine, _sweep_one, cfgs, progress=progress, failures=failures) if s is not None]
    else:
        groups = [
            (model, dataset, gated, tuple(seeds), epochs, data_dir, str(out))
            for model in models or BF_MODELS
            for dataset in datasets or BMRS_DATASETS
            for gated in (False, True)
        ]
        run_all(engine, _bf_group, groups, progress=progress, failures=failures)
        from .results import find_summaries

        summaries = [s for _, s in find_summaries([out])]
    return summaries, failures
