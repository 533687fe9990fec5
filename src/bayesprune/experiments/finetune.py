"""Dense fine-tune of a pruned network (docs/maths.md section 4.5).

After a continuous BMRS run (:func:`~bayesprune.experiments.training.run_continuous`), the
network of its best-validation checkpoint is shrunk (:func:`bayesprune.shrink`: ``E[θ]·mask``
folded into the weights, the masked structures removed, the noise modules dropped), and the
small plain network is trained ``dense_finetune_epochs`` more epochs with cross-entropy only (no
noise, no KL), Adam at ``dense_finetune_lr`` (default: the run's ``lr``), annealed per epoch by
``dense_finetune_schedule``; the reported test accuracy is that of the best-validation epoch.

The pruning run is the run directory of the same configuration with ``dense_finetune_epochs =
0``, so a finished pruning run is reused; the fine-tune has a run directory of its own inside it,
``<run dir>/<dense_dir_name(cfg)>`` (config.json, metrics.jsonl, checkpoint.pt, summary.json;
written atomically, locked, resumed like every run directory).  On resume the small network is
rebuilt by shrinking the pruning run's final checkpoint again (deterministic), then loaded.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..noise import noise_layers
from ..removal import count_parameters, shrink
from . import rundir as files
from .data import make_loader
from .training import (CheckpointError, RunConfig, RunDir, TrainingDiverged, _build, _device, _rebuild_shrunk, _rng_state,
                       _seed_all, _set_rng_state, _train_epoch, evaluate, load_splits, run_continuous)

__all__ = ["DENSE_FIELDS", "SCHEDULES", "dense_dir_name", "dense_start", "pruning_config", "pruned_network", "run_dense_finetune",
           "schedule_factor"]

#: RunConfig fields of the dense fine-tune; the pruning run has them at their RunConfig defaults
DENSE_FIELDS = ("dense_finetune_epochs", "dense_finetune_lr", "dense_finetune_schedule")
_DEFAULTS = {f.name: f.default for f in fields(RunConfig)}
#: learning-rate schedules of the dense fine-tune, per epoch e of F (docs/maths.md section 4.5)
SCHEDULES = ("cosine", "constant")


def schedule_factor(schedule: str, epoch: int, epochs: int) -> float:
    """Learning-rate factor of epoch ``epoch`` (0-based) of ``epochs``: cosine (1 + cos(π e / F)) / 2
    (SGDR without restarts, docs/maths.md section 4.5), constant 1."""
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"unknown dense_finetune_schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")


def pruning_config(cfg: RunConfig) -> RunConfig:
    """The configuration of the pruning run under a dense fine-tune: ``cfg`` with the dense
    fine-tune fields at their defaults (the same run directory as without the option)."""
    out = copy.deepcopy(cfg)
    for name in DENSE_FIELDS:
        setattr(out, name, _DEFAULTS[name])
    return out


def dense_dir_name(cfg: RunConfig) -> str:
    """``dense-ft<F>[-lr<lr> when set][-<schedule> when not cosine]``, inside the pruning run's directory."""
    name = f"dense-ft{cfg.dense_finetune_epochs}"
    if cfg.dense_finetune_lr is not None:
        name += f"-lr{cfg.dense_finetune_lr:g}"
    if cfg.dense_finetune_schedule != _DEFAULTS["dense_finetune_schedule"]:
        name += f"-{cfg.dense_finetune_schedule}"
    return name


def pruned_network(cfg: RunConfig, device=None):
    """(noisy masked model of the finished pruning run's reported checkpoint, example input, splits,
    device), rebuilt from its run directory (``cfg``: the pruning run's configuration)."""
    device = _device(cfg.device) if device is None else device
    splits = load_splits(cfg)
    _seed_all(cfg.seed)
    model, example = _build(cfg, splits, device)
    rd = RunDir(cfg.out_dir)
    state = rd.load()
    if state is None or not rd.summary.exists():
        raise CheckpointError(f"{rd.path} holds no finished pruning run (summary.json and checkpoint.pt): "
                              "run it first (run_continuous)")
    try:
        if state.get("kept_index") is not None:
            model = _rebuild_shrunk(model, example, state["kept_index"])
        model.load_state_dict((state.get("best") or {}).get("model") or state["model"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{rd.loaded_from} does not fit this run's model ({type(e).__name__}: "
                              f"{str(e).splitlines()[0]}); delete {rd.path} to start over") from None
    return model, example, splits, device


def dense_start(cfg: RunConfig):
    """(noisy masked model, its shrunk plain copy, example input, splits, device) of the finished
    pruning run of ``cfg``: the network the dense fine-tune starts from."""
    noisy, example, splits, device = pruned_network(pruning_config(cfg))
    return noisy, shrink(noisy, example), example, splits, device  # shrink verifies: same eval output


def run_dense_finetune(cfg: RunConfig, progress: bool = True) -> dict:
    """Prune (or read the finished pruning run), shrink, fine-tune the plain network with
    cross-entropy only; returns the fine-tune's summary (``test_acc``, ``param_compression`` etc.
    of the fine-tuned small network, ``pruned``: the pruning run's numbers, ``size_speed``)."""
    cfg.validate()
    if cfg.dense_finetune_epochs < 1:
        raise ValueError(f"dense_finetune_epochs must be >= 1 for a dense fine-tune, got {cfg.dense_finetune_epochs}")
    pcfg = pruning_config(cfg)
    pruned = run_continuous(pcfg, progress=progress)
    rd = RunDir(Path(cfg.out_dir) / dense_dir_name(cfg))
    dcfg = copy.deepcopy(cfg)
    dcfg.out_dir = str(rd.path)
    done = rd.finished(dcfg)
    if done is not None:
        return done
    with rd.locked():
        return rd.finished(dcfg) or _run(dcfg, pcfg, pruned, rd, progress)


def _run(cfg: RunConfig, pcfg: RunConfig, pruned: dict, rd: RunDir, progress: bool) -> dict:
    rd.check_config(cfg)
    t_start = time.time()
    noisy, small, example, splits, device = dense_start(pcfg)
    params_dense = int(pruned["params_dense"])
    start_loss, start_acc = evaluate(small, splits.test, device)
    lr = cfg.dense_finetune_lr if cfg.dense_finetune_lr is not None else cfg.lr
    opt = torch.optim.Adam(small.parameters(), lr=lr)
    torch.manual_seed(cfg.seed)
    start_epoch, rows, best = 0, 0, None
    state = rd.load()
    if state is not None:
        try:
            small.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            _set_rng_state(state["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{rd.loaded_from} does not fit the shrunk network ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0]}); delete {rd.path} to start over") from None
        start_epoch, rows, best = int(state["epoch"]), int(state["metric_rows"]), state.get("best")
        t_start -= float(state.get("elapsed", 0.0))
    rd.truncate_metrics(rows)
    F = cfg.dense_finetune_epochs
    bar = tqdm(range(start_epoch, F), desc=f"dense fine-tune {cfg.model}/{cfg.dataset} seed {cfg.seed}",
               disable=not progress, initial=start_epoch, total=F)
    for epoch in bar:
        for group in opt.param_groups:
            group["lr"] = lr * schedule_factor(cfg.dense_finetune_schedule, epoch, F)
        loader = make_loader(splits.train, cfg.batch_size, shuffle=True, seed=cfg.seed * 100003 + 7 * 10**6 + epoch)
        t0 = time.perf_counter()
        try:
            loss, ce, _ = _train_epoch(small, opt, loader, cfg, splits.num_train, device, f"dense fine-tune epoch {epoch + 1}")
        except TrainingDiverged as e:
            raise TrainingDiverged(f"{e}; {rd.describe_checkpoints()}") from None
        train_time = time.perf_counter() - t0
        val_loss, val_acc = evaluate(small, splits.val, device)
        if epoch == start_epoch:
            rd.write_config(cfg)
        rd.append_metrics(dict(epoch=epoch + 1, phase="dense_finetune", lr=opt.param_groups[0]["lr"], train_loss=loss,
                               train_ce=ce, val_loss=val_loss, val_acc=val_acc, params=count_parameters(small),
                               epoch_time=train_time))
        rows += 1
        if best is None or val_acc > best["val_acc"]:
            best = {"val_acc": val_acc, "epoch": epoch + 1, "model": copy.deepcopy(small.state_dict())}
        bar.set_postfix(val_acc=f"{val_acc:.4f}")
        rd.save(dict(model=small.state_dict(), optimizer=opt.state_dict(), rng=_rng_state(), epoch=epoch + 1,
                     metric_rows=rows, best=best, elapsed=time.time() - t_start))
    small.load_state_dict(best["model"])
    test_loss, test_acc = evaluate(small, splits.test, device)
    params_kept = count_parameters(small)
    summary = dict(
        config=asdict(cfg),
        kind="dense_finetune",
        test_acc=test_acc,
        test_loss=test_loss,
        best_epoch=best["epoch"],
        best_val_acc=best["val_acc"],
        start_test_acc=start_acc,
        start_test_loss=start_loss,
        param_compression=1 - params_kept / params_dense,
        structure_compression=pruned["structure_compression"],
        params_dense=params_dense,
        params_kept=params_kept,
        noise_layers=len(noise_layers(small)),
        layers=pruned.get("layers"),
        pruned={k: pruned.get(k) for k in ("test_acc", "param_compression", "params_kept", "best_epoch", "wall_time_s")},
        size_speed=_size_speed(noisy, small, example),
        wall_time_s=time.time() - t_start,
        total_wall_time_s=time.time() - t_start + float(pruned.get("wall_time_s") or 0.0),
        machine=pruned.get("machine"),
    )
    files.write_json(rd.summary, summary)
    with contextlib.suppress(OSError):
        rd.previous.unlink()
    return summary


def _size_speed(noisy, small, example) -> dict | None:
    """Parameters, MACs and latency of the unpruned plain network against the fine-tuned small one."""
    from ..benchmarking import size_speed_report

    return size_speed_report(copy.deepcopy(noisy).cpu(), copy.deepcopy(small).cpu().eval(), example.cpu()).to_dict()
