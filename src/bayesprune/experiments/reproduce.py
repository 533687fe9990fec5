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

__all__ = ["TARGETS", "ENSEMBLE_AUTO", "bmrs_table1_configs", "bmrs_table2_configs", "table2", "reproduce", "check_ensemble",
           "ensemble_groups", "ensemble_sizes"]

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
                name = run_dir_name(model, dataset, method, precision, thr, kl_weighting=extra.get("kl_weighting"))
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


#: ``reproduce``'s ``ensemble`` (and ``--ensemble``) default: a timed probe decides, per group of
#: runs that could share an ensemble, whether it trains batched (docs/scale-out.md)
ENSEMBLE_AUTO = "auto"


def check_ensemble(ensemble) -> None:
    """ValueError unless ``ensemble`` is "auto" or an integer >= 1 (1: single runs)."""
    if ensemble != ENSEMBLE_AUTO and (isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1):
        raise ValueError(f"ensemble must be {ENSEMBLE_AUTO!r} or an integer >= 1 (1: single runs), got {ensemble!r}")


class _Group(tuple):
    """The RunConfigs of one engine task (one ensemble, or one single run) with the choice to
    record in their summaries (``record``: ``{"size": K, "probe_ratio": r}``, or None)."""

    def __new__(cls, cfgs, record=None):
        self = super().__new__(cls, cfgs)
        self.record = record
        return self

    def __reduce__(self):
        return (_Group, (tuple(self), self.record))

    @property
    def out_dir(self) -> str:  # what run_all prints
        return str(self[0].out_dir) if len(self) == 1 else f"{self[0].out_dir} and {len(self) - 1} more (one ensemble)"


def _group_task(group: _Group) -> list:
    """The runs of ``group``: one run_continuous, or one batched ensemble (ensemble.py); per
    member its summary (with the recorded choice) or its error text."""
    from .ensemble import run_ensemble

    if len(group) == 1:
        results = [run_continuous(group[0], progress=False)]
    else:
        results = [r if isinstance(r, dict) else f"{type(r).__name__}: {r}" for r in run_ensemble(list(group))]
    if group.record is not None:
        for cfg, r in zip(group, results):
            if isinstance(r, dict):
                _record(cfg, r, group.record)
    return results


def _record(cfg: RunConfig, summary: dict, record: dict) -> None:
    """``record`` as ``"ensemble"`` of the run's summary (and of its summary.json)."""
    from .rundir import RunLockedError, read_json, write_json
    from .training import RunDir

    rd = RunDir(cfg.out_dir)
    try:
        with rd.locked():
            on_disk = read_json(rd.summary)
            on_disk["ensemble"] = dict(record)
            write_json(rd.summary, on_disk)
    except (RunLockedError, OSError, ValueError) as e:  # the run itself finished: say so, go on
        print(f"warning: {rd.summary}: the ensemble choice was not recorded ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if not cfg.dense_finetune_epochs:  # else ``summary`` is the dense fine-tune's, in a folder of its own
        summary["ensemble"] = dict(record)


def _probe_task(task: tuple):
    """ensemble.probe of one group on the engine (the device and threads its runs get)."""
    from .ensemble import probe

    cfgs, timer, share = task
    return probe(cfgs, share=share) if timer is None else probe(cfgs, share=share, timer=timer)


class _ProbeTask(tuple):
    """(the members' RunConfigs, the timer or None, the tasks sharing the device) of one probe."""

    @property
    def out_dir(self) -> str:  # what run_all prints
        return f"ensemble probe of {self[0][0].model}/{self[0][0].dataset} ({len(self[0])} members)"


def _key(cfg: RunConfig, i: int):
    from .ensemble import SHARED_FIELDS

    if cfg.shrink:
        return ("alone", i)
    d = asdict(cfg)
    return tuple(repr(d[f]) for f in SHARED_FIELDS)


def _chunks(idx: list, size: int) -> list[tuple]:
    """``idx`` in ceil(len / size) consecutive groups of as equal sizes as possible."""
    n = -(-len(idx) // size)
    q, r = divmod(len(idx), n)
    out, j = [], 0
    for c in range(n):
        k = q + (c < r)
        out.append(tuple(idx[j:j + k]))
        j += k
    return out


def ensemble_groups(cfgs, size: int) -> list[tuple]:
    """``cfgs`` in groups of at most ``size`` that share a network and its training
    (ensemble.SHARED_FIELDS) and do not shrink, in the order of their first member."""
    keyed: dict = {}
    for i, cfg in enumerate(cfgs):
        keyed.setdefault(_key(cfg, i), []).append(i)
    return [tuple(idx[j:j + size]) for idx in keyed.values() for j in range(0, len(idx), size)]


def ensemble_sizes(counts, slots: int, most: int | None = None) -> list[int]:
    """Members per ensemble for groups of ``counts`` runs on an engine of ``slots`` parallel
    tasks: each group in ceil(n / size) ensembles, at least ceil(n / ``most``) of them
    (default ensemble.MAX_MEMBERS) and at least its share ceil(slots / groups) of the slots
    (never more than n), as equal as they come: size = ceil(n / ensembles)."""
    from .ensemble import MAX_MEMBERS

    most = MAX_MEMBERS if most is None else most
    share = -(-slots // max(1, len(counts)))
    return [-(-n // max(-(-n // most), min(n, share))) for n in counts]


def _auto_groups(engine, cfgs, todo: list, progress: bool, timer) -> list[_Group]:
    """``--ensemble auto``: per group of the runs ``todo`` that could share an ensemble, a probe
    (ensemble.probe, on the engine) of :func:`ensemble_sizes` members (fewer where the memory
    does not hold them); batched in ensembles of that size if the probe found the ensemble
    faster, else single runs."""
    keyed: dict = {}
    for i in todo:
        keyed.setdefault(_key(cfgs[i], i), []).append(i)
    shared = [idx for idx in keyed.values() if len(idx) > 1]
    slots = max(1, int(getattr(engine, "jobs", 1)))
    sizes = dict(zip(map(id, shared), ensemble_sizes([len(idx) for idx in shared], slots)))
    probed = [idx for idx in shared if sizes[id(idx)] > 1]
    tasks = [_ProbeTask((tuple(cfgs[i] for i in idx[:sizes[id(idx)]]), timer, min(slots, len(probed)))) for idx in probed]
    probes = run_all(engine, _probe_task, tasks, progress=False, failures=[]) if tasks else []
    choice = {}
    for idx, p in zip(probed, probes):
        c = cfgs[idx[0]]
        what = f"ensemble probe {c.model}/{c.dataset}, {len(idx)} runs"
        if p is None or p.error is not None:
            if progress:
                print(f"{what}: cannot train batched ({'the probe failed' if p is None else p.error}); single runs", flush=True)
            continue
        head = (f"{what}: {p.size} single runs {p.single_s:.3f} s, one ensemble of {p.size} {p.ensemble_s:.3f} s "
                f"({p.steps} steps, medians of {p.repeats} passes): ensemble/single throughput {p.ratio:.2f}x")
        if p.batched:
            groups = _chunks(idx, p.size)
            if progress:
                print(f"{head} -> batched: ensembles of {', '.join(str(len(g)) for g in groups)}", flush=True)
            for g in groups:
                choice[g[0]] = (g, {"size": len(g), "probe_ratio": round(p.ratio, 4)})
        else:
            if progress:
                print(f"{head} -> single runs", flush=True)
            for i in idx:
                choice[i] = ((i,), {"size": 1, "probe_ratio": round(p.ratio, 4)})
    out, placed = [], set()
    for i in todo:
        if i in placed:
            continue
        g, record = choice.get(i, ((i,), None))
        placed.update(g)
        out.append(_Group([cfgs[j] for j in g], record))
    return out


def _run_continuous_all(engine, cfgs, progress, failures, ensemble, probe_timer=None) -> list:
    """run_continuous on every config.  ``ensemble`` 1: one engine task per run; K > 1: groups of
    up to K runs that share a network train as one batched ensemble each (one engine task per
    group); "auto": a probe per group decides (:func:`_auto_groups`; ``probe_timer``: the probe's
    timer, ensemble.wall_clock by default).  Runs finished before are only read."""
    if ensemble == 1:
        return run_all(engine, _run_one, cfgs, progress=progress, failures=failures)
    from .training import RunDir

    todo = [i for i, c in enumerate(cfgs) if not RunDir(c.out_dir).summary.exists()]
    if ensemble == ENSEMBLE_AUTO:
        groups = _auto_groups(engine, cfgs, todo, progress, probe_timer)
    else:
        groups = [_Group([cfgs[todo[j]] for j in g], {"size": len(g), "probe_ratio": None} if len(g) > 1 else None)
                  for g in ensemble_groups([cfgs[i] for i in todo], ensemble)]
    index = {id(c): i for i, c in enumerate(cfgs)}
    pending = set(todo)
    groups += [_Group([cfgs[i]]) for i in range(len(cfgs)) if i not in pending]
    out = [None] * len(cfgs)
    lost: list[RunOutcome] = []
    for g, res in zip(groups, run_all(engine, _group_task, groups, progress=progress, failures=lost)):
        for c, r in zip(g, res or []):
            i = index[id(c)]
            if isinstance(r, str):
                failures.append(RunOutcome(i, c, error=r))
                print(f"FAILED {c.out_dir}: {r}", file=sys.stderr, flush=True)
            else:
                out[i] = r
    for o in lost:  # the whole task failed: each of its runs
        failures.extend(RunOutcome(index[id(c)], c, error=o.error, traceback=o.traceback) for c in o.config)
    return out


BF_MODELS = ("fcn", "cnn")
BF_SPARSITIES = ("0.25", "0.5", "0.75", "0.9", "0.99")


def _bf_group(group) -> list[dict]:
    """Every sparsity and seed of one (model, data set, gate), as ``bayesprune bf-run`` runs them;
    returns their summaries.  ``ensemble`` 1: one run after another; K > 1: the unfinished runs
    in batched ensembles of up to K (ensemble.run_bf_ensemble); "auto": a probe
    (ensemble.bf_probe, here on the engine's worker) decides.  A failed run does not stop the
    others; the group then raises, naming each failed run and its error."""
    from .bf_training import bayes_factor_grid, bf_run_dir, run_bayes_factor
    from .ensemble import bf_probe, run_bf_ensemble
    from .rundir import read_json, write_json

    model, dataset, gated, seeds, epochs, data_dir, out, ensemble = group
    modes = ["random", "magnitude"] + ([] if gated else ["none"])
    options = dict(model=model, dataset=dataset, gated=gated, out_dir=str(out), quiet=True)
    if epochs is not None:
        options["epochs"] = int(epochs)
    if data_dir is not None:
        options["data_dir"] = str(data_dir)
    configs = bayes_factor_grid(modes=modes, sparsities=[float(r) for r in BF_SPARSITIES], seeds=seeds, **options)
    todo = [c for c in configs if not (bf_run_dir(c) / "summary.json").exists()]
    size, record = 1, None
    if ensemble != 1 and len(todo) > 1:
        if ensemble == ENSEMBLE_AUTO:
            p = bf_probe(todo)
            what = f"ensemble probe bf {model}/{dataset} {'gated' if gated else 'plain'}, {len(todo)} runs"
            if p.error is not None:
                print(f"{what}: cannot train batched ({p.error}); single runs", flush=True)
            else:
                size = p.size if p.batched else 1
                print(f"{what}: {p.size} single runs {p.single_s:.3f} s, one ensemble of {p.size} {p.ensemble_s:.3f} s "
                      f"({p.steps} steps, medians of {p.repeats} passes): ensemble/single throughput {p.ratio:.2f}x -> "
                      f"{'batched' if size > 1 else 'single runs'}", flush=True)
                record = {"size": size, "probe_ratio": round(p.ratio, 4)}
        else:
            size = min(int(ensemble), len(todo))
            record = {"size": size, "probe_ratio": None}
    cache: dict = {}
    summaries = {id(c): run_bayes_factor(c, data_cache=cache) for c in configs if c not in todo}  # finished: read
    failed = []
    for chunk in _chunks(todo, size) if todo else []:
        if len(chunk) == 1:
            try:
                results = [run_bayes_factor(chunk[0], data_cache=cache)]
            except Exception as e:  # noqa: BLE001 - reported with the others below
                results = [e]
        else:
            results = run_bf_ensemble(chunk)
        for cfg, r in zip(chunk, results):
            path = bf_run_dir(cfg) / "summary.json"
            if isinstance(r, BaseException):
                failed.append(f"{bf_run_dir(cfg)}: {type(r).__name__}: {r}")
                continue
            if record is not None and path.exists():
                r = dict(r, ensemble=dict(record, size=len(chunk)))
                write_json(path, dict(read_json(path), ensemble=r["ensemble"]))
            summaries[id(cfg)] = r
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(configs)} Bayes-factor runs failed: " + "; ".join(failed))
    return [summaries[id(c)] for c in configs]


def reproduce(name: str, out: str | Path, seeds=(0,), epochs=None, finetune_epochs=None, data_dir=None, jobs: int = 1, models=None, datasets=None, progress: bool = True, engine=None, ensemble: int | str = ENSEMBLE_AUTO, probe_timer=None, **extra) -> dict:
    """Run (or resume) every run of target ``name`` on ``engine`` (default ``LocalEngine(jobs)``);
    returns {"summaries": [...], "wall_time_s": ..., "failures": [RunOutcome of each failed run]}.
    ``ensemble`` (bmrs-table1, bmrs-table2, bf-table1): "auto" (default) lets a timed probe decide
    per group of runs sharing a network whether they train as batched ensembles (ensemble.py), 1
    forces single runs, K > 1 ensembles of up to K runs; the choice is each summary's
    ``"ensemble"`` (docs/scale-out.md).  ``probe_timer(kind, work)``: the probe's timer (ensemble.wall_clock)."""
    if name not in TARGETS:
        raise ValueError(f"unknown reproduction {name!r}; valid: {', '.join(TARGETS)}")
    check_ensemble(ensemble)
    if name == "bmrs-posttrain":
        if ensemble not in (1, ENSEMBLE_AUTO):
            raise ValueError(f"ensemble applies to bmrs-table1, bmrs-table2 and bf-table1, not {name}")
        ensemble = 1  # auto: nothing to batch
    engine = LocalEngine(jobs) if engine is None else engine
    t0 = time.time()
    with engine:  # one Ray for every stage of the target
        summaries, failures = _reproduce(name, out, seeds, epochs, finetune_epochs, data_dir, models, datasets, progress, engine, ensemble,
                                         probe_timer, **extra)
    return {"summaries": summaries, "wall_time_s": time.time() - t0, "failures": failures}


def _reproduce(name, out, seeds, epochs, finetune_epochs, data_dir, models, datasets, progress, engine, ensemble=1, probe_timer=None, **extra) -> tuple[list, list[RunOutcome]]:
    failures: list[RunOutcome] = []
    if epochs is not None and finetune_epochs is None:
        finetune_epochs = min(10, epochs)  # a short smoke run should not fine-tune 10 epochs
    out = Path(out)
    if name in ("bmrs-table1", "bmrs-table2"):
        if name == "bmrs-table1":
            cfgs = bmrs_table1_configs(out, seeds, epochs, finetune_epochs, data_dir, models or BMRS_MODELS, datasets or BMRS_DATASETS, **extra)
        else:
            cfgs = bmrs_table2_configs(out, seeds, epochs, finetune_epochs, data_dir, models or TABLE2_MODELS, datasets or TABLE2_DATASETS, **extra)
        summaries = _run_continuous_all(engine, cfgs, progress, failures, ensemble, probe_timer)
        # L2 at BMRS_N's compression, per (model, dataset, seed)
        l2 = []
        thresholded = {(c.model, c.dataset, c.seed) for c in cfgs if c.method == "bmrs_n" and c.threshold is not None}
        for cfg, s in zip(cfgs, summaries):
            key = (cfg.model, cfg.dataset, cfg.seed)
            if s is not None and cfg.method == "bmrs_n" and ((cfg.threshold is not None) == (key in thresholded)):
                d = asdict(cfg)
                d.update(method="l2", threshold=None, prior_odds=None, compression=float(s["param_compression"]), out_dir=str(out / run_dir_name(cfg.model, cfg.dataset, "l2", kl_weighting=cfg.kl_weighting) / f"seed{cfg.seed}"))
                l2.append(RunConfig(**d))
        summaries = [s for s in summaries + _run_continuous_all(engine, l2, progress, failures, ensemble, probe_timer) if s is not None]
    elif name == "bmrs-posttrain":
        cfgs = []
        for model in models or BMRS_MODELS:
            for dataset in datasets or BMRS_DATASETS:
                for seed in seeds:
                    extra.pop("threshold", None)
                    cfgs.append(resolve_config(model=model, dataset=dataset, method="none", seed=seed, epochs=epochs, finetune_epochs=0, data_dir=data_dir, out_dir=str(out / run_dir_name(model, dataset, "sweep", kl_weighting=extra.get("kl_weighting")) / f"seed{seed}"), **extra))
        summaries = [s for s in run_all(engine, _sweep_one, cfgs, progress=progress, failures=failures) if s is not None]
    else:
        groups = [
            (model, dataset, gated, tuple(seeds), epochs, data_dir, str(out), ensemble)
            for model in models or BF_MODELS
            for dataset in datasets or BMRS_DATASETS
            for gated in (False, True)
        ]
        run_all(engine, _bf_group, groups, progress=progress, failures=failures)
        from .results import find_summaries

        summaries = [s for _, s in find_summaries([out])]
    return summaries, failures
