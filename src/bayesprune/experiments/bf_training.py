"""The Bayes-factor training loop and run (Mathew and Rowe; docs/maths.md section 5): Adam on an
ordinary network with :class:`bayesprune.bayes_factor.BayesFactorPruner` at the end of every epoch,
with per-epoch checkpoints from which an interrupted run resumes exactly; and
:func:`run_bayes_factor`, one run directory of ``bayesprune bf-run`` and ``reproduce bf-table1``."""

from __future__ import annotations

import contextvars
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..bayes_factor import (LIKELIHOOD_BATCH_SIZE, MODES, SKIP_POLICIES, BayesFactorPruner, count_dead_structures,
                            prunable_weights, shrink_dead)
from ..bayes_factor.posterior import _model_device
from . import rundir as files
from .data import make_loader
from .training import evaluate, load_checkpoint, save_checkpoint

__all__ = ["train_bayes_factor", "BayesFactorRunConfig", "bayes_factor_grid", "bf_run_dir", "run_bayes_factor", "EPOCH_RUNNER"]

#: the training epoch :func:`train_bayes_factor` runs, ``(model, optimizer, loader, device, masks)
#: -> mean training loss``, where set (default :func:`_train_epoch`): ensemble.py sets it in each
#: member's thread to hand the epoch to one batched epoch of all members
EPOCH_RUNNER: contextvars.ContextVar = contextvars.ContextVar("BF_EPOCH_RUNNER", default=None)


def _train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader, device, masks) -> float:
    """One epoch of cross-entropy and Adam; the mean training loss per example.  ``masks`` (the
    pruner's WeightMasks in persistent mode, or None) re-zeroes pruned weights after each step
    through the post-step hook the pruner attached to ``optimizer``; the batched epoch applies
    them itself."""
    model.train()
    total, n = 0.0, 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()  # the pruner's post-step hook re-zeroes pruned weights
        total += float(loss.item()) * int(y.shape[0])
        n += int(y.shape[0])
    return total / max(1, n)


def _run_config(epochs: int, lr: float, batch_size: int, seed: int, pruner: BayesFactorPruner | None) -> dict[str, Any]:
    return {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "pruner": None
        if pruner is None
        else {
            "mode": pruner.mode,
            "sparsity": pruner.sparsity,
            "beta": pruner.beta,
            "gated": pruner.gated,
            "prior_mean": pruner.prior_mean,
            "prior_std": pruner.prior_std,
            "first_log_bf": pruner.first_log_bf,
            "persistent": pruner.persistent,
            "steps": pruner.steps,
            "on_skip": pruner.on_skip,
            "likelihood_batches": pruner.likelihood_batches,
        },
    }


def _save_checkpoint(path: Path, epoch: int, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
                     pruner: BayesFactorPruner | None, loader_generator: torch.Generator, history: dict) -> None:
    """Everything :func:`train_bayes_factor` needs to go on after ``epoch``, written atomically."""
    state = {
        "epoch": epoch,
        "config": config,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "loader_generator": loader_generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": history,
        "pruner": None
        if pruner is None
        else {
            "masks": pruner.masks.state_dict(),
            "log_bf": pruner.log_bf,
            "prune_events": pruner.prune_events,
            "history": pruner.history,
            "generator": pruner.generator.get_state(),
        },
    }
    save_checkpoint(state, path)


def _resume(path: Path, config: dict, model: nn.Module, optimizer: torch.optim.Optimizer,
            pruner: BayesFactorPruner | None, loader_generator: torch.Generator, history: dict) -> int:
    """Load the checkpoint at ``path`` into the given objects; returns its epoch."""
    state = load_checkpoint(path)
    theirs = {k: v for k, v in state["config"].items() if k != "epochs"}
    ours = {k: v for k, v in config.items() if k != "epochs"}
    if theirs != ours:
        diff = {k: (theirs.get(k), ours.get(k)) for k in ours if theirs.get(k) != ours.get(k)}
        raise ValueError(f"checkpoint {path} was written by a run with another configuration "
                         f"(checkpoint, now): {diff}; delete it or use another directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    loader_generator.set_state(state["loader_generator"])
    torch.set_rng_state(state["torch_rng"])
    for k, v in state["history"].items():
        history[k] = list(v)
    if pruner is not None:
        p = state["pruner"]
        pruner.masks.load_state_dict(p["masks"])
        pruner.log_bf = float(p["log_bf"])
        pruner.prune_events = int(p["prune_events"])
        pruner.history = list(p["history"])
        pruner.generator.set_state(p["generator"])
    return int(state["epoch"])


def train_bayes_factor(
    model: nn.Module,
    splits: Any,
    epochs: int = 25,
    lr: float = 1e-3,
    batch_size: int = 64,
    pruner: BayesFactorPruner | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    seed: int = 0,
    eval_batch_size: int = LIKELIHOOD_BATCH_SIZE,
    num_workers: int = 0,
    report_shrink: bool = True,
    checkpoint: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train ``model`` with Adam on ``splits.train``, calling ``pruner.end_of_epoch`` each epoch.

    ``splits`` has ``.train``, ``.val`` and ``.test`` torch Datasets.  With ``pruner=None`` this is
    the unpruned baseline.  If the pruner has no likelihood data, the training set is used (the
    paper's D), subject to the pruner's ``likelihood_batches``.  The model is moved to ``device``
    (default: where it already is).  Per epoch: train (mean loss), prune (pruner), then validate,
    so the validation numbers are those of the pruned network.

    Returns a dict of per-epoch lists (``epoch``, ``train_loss``, ``val_loss``, ``val_acc``,
    ``log_bf``, ``pruned``, ``sparsity``, ``layer_sparsity``, ``dead_structures``, ``seconds``)
    and the final ``test_loss``/``test_acc`` of the model after the last epoch, plus ``config`` and
    ``resumed_from_epoch`` (0, or the checkpoint's epoch this call went on from).
    With ``report_shrink`` (default) ``history["shrink_dead"]`` is :func:`shrink_dead`'s report on
    the final model (dead structures per layer, how many were removed, ``params_before`` /
    ``params_after``; ``{"error": ...}`` if it failed); the model itself is not changed.

    With ``checkpoint`` (a file path) the state after every epoch is written there atomically
    (weights, Adam state, masks, the gate's stored log BF, the pruner's and the loader's random
    generators, the history so far); if the file exists, training resumes after its last epoch
    and continues exactly as the uninterrupted run would have.  A checkpoint written with another
    configuration (learning rate, batch size, seed, pruner settings) is refused.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got {epochs!r}")
    if device is not None:
        model.to(device)
    dev = _model_device(model)
    if pruner is not None and pruner.model is not model:
        raise ValueError("pruner was built for a different model")
    train_loader = make_loader(splits.train, batch_size, shuffle=True, seed=seed, num_workers=num_workers)
    g = train_loader.generator
    if pruner is not None and pruner.likelihood_data is None and (pruner.gated or pruner.compute_bf):
        pruner.set_likelihood_data(
            DataLoader(splits.train, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers)
            if pruner.likelihood_batches is None
            else splits.train
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    if pruner is not None:
        pruner.attach(optimizer)

    history: dict[str, Any] = {
        k: []
        for k in (
            "epoch", "train_loss", "val_loss", "val_acc", "log_bf", "pruned", "num_pruned",
            "sparsity", "layer_sparsity", "dead_structures", "seconds",
        )
    }
    config = _run_config(epochs, lr, batch_size, seed, pruner)
    start = 0
    if checkpoint is not None and Path(checkpoint).exists():
        start = _resume(Path(checkpoint), config, model, optimizer, pruner, g, history)
        if start > epochs:
            raise ValueError(f"checkpoint {checkpoint} is at epoch {start}, past the {epochs} epochs asked for")
    epoch_iter: Iterable[int] = range(start + 1, epochs + 1)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(epoch_iter, desc="bf-train", unit="epoch", initial=start, total=epochs)
            epoch_iter = bar
        except ImportError:  # pragma: no cover
            bar = None
    weights = pruner.masks.weights if pruner is not None else prunable_weights(model)
    for epoch in epoch_iter:
        t0 = time.perf_counter()
        masks = pruner.masks if pruner is not None and pruner.persistent else None
        train_loss = (EPOCH_RUNNER.get() or _train_epoch)(model, optimizer, train_loader, dev, masks)
        record = pruner.end_of_epoch(epoch, optimizer=optimizer) if pruner is not None else None
        val_loss, val_acc = evaluate(model, splits.val, dev, batch_size=eval_batch_size)
        zeros = {name: float((w.detach() == 0).float().mean().item()) for name, w in weights.items()}
        numel = sum(w.numel() for w in weights.values())
        history["epoch"].append(epoch)
        history["train_loss"].append(train_loss)
        history["val_loss"].append(val_loss)
        history["val_acc"].append(val_acc)
        history["log_bf"].append(record["log_bf"] if record else math.nan)
        history["pruned"].append(record["pruned"] if record else False)
        history["num_pruned"].append(record["num_pruned"] if record else 0)
        history["layer_sparsity"].append(zeros)
        history["sparsity"].append(
            sum(zeros[k] * weights[k].numel() for k in weights) / max(1, numel)
        )
        history["dead_structures"].append(count_dead_structures(model, list(weights))["dead"])
        history["seconds"].append(time.perf_counter() - t0)
        if checkpoint is not None:
            _save_checkpoint(Path(checkpoint), epoch, config, model, optimizer, pruner, g, history)
        if bar is not None:
            bar.set_postfix(
                loss=f"{history['train_loss'][-1]:.3f}",
                val_acc=f"{val_acc:.3f}",
                sparsity=f"{history['sparsity'][-1]:.2f}",
                log_bf=f"{history['log_bf'][-1]:.3g}",
            )
    test_loss, test_acc = evaluate(model, splits.test, dev, batch_size=eval_batch_size)
    history["resumed_from_epoch"] = start
    history["test_loss"] = test_loss
    history["test_acc"] = test_acc
    history["config"] = config
    if pruner is not None:
        history["pruner_history"] = pruner.history
    if report_shrink:
        try:
            n = min(32, len(splits.train))
            xs = torch.stack([splits.train[i][0] for i in range(n)]).to(dev)
            history["shrink_dead"] = shrink_dead(model, xs[:8], xs[8:])[1]
        except Exception as e:  # a report only: never fail the training run for it
            history["shrink_dead"] = {"error": f"{type(e).__name__}: {e}"}
    return history


# ---------------------------------------------------------------------------------------------
# one run directory of `bayesprune bf-run` / `reproduce bf-table1`
@dataclass(frozen=True)
class BayesFactorRunConfig:
    """One Bayes-factor run: (model, data set, mode, sparsity, seed) and the gate's settings.

    ``mode`` is ``"none"`` (the unpruned baseline, ``sparsity`` None), ``"random"`` or
    ``"magnitude"``; ``spare_output`` leaves the output layer unpruned.  The fields, in this order,
    are the ``config`` of the run's summary.json (the options of ``bayesprune bf-run``).
    """

    dataset: str = "digits"
    model: str = "fcn"
    data_dir: str | None = None
    download: bool = False
    out_dir: str = "runs"
    gated: bool = True
    beta: float = 1.0
    prior_std: float = 1.0
    prior_mean: float = 0.0
    first_log_bf: float = math.inf
    likelihood_batches: int | None = None
    steps: int = 1
    spare_output: bool = False
    on_skip: str = "unit"
    epochs: int = 25
    batch_size: int = 64
    lr: float = 1e-3
    device: str = "auto"
    quiet: bool = False
    mode: str = "random"
    sparsity: float | None = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("none",) + MODES:
            raise ValueError(f"mode must be one of none, {', '.join(MODES)}; got {self.mode!r}")
        if self.mode != "none" and (self.sparsity is None or not 0 <= self.sparsity < 1):
            raise ValueError(f"sparsity must lie in [0, 1), got {self.sparsity!r}")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.on_skip not in SKIP_POLICIES:
            raise ValueError(f"on_skip must be one of {', '.join(SKIP_POLICIES)}; got {self.on_skip!r}")


def bayes_factor_grid(*, modes: Iterable[str], sparsities: Iterable[float], seeds: Iterable[int],
                      **options) -> list[BayesFactorRunConfig]:
    """One :class:`BayesFactorRunConfig` per (mode, sparsity, seed), in that order; the unpruned
    mode ``"none"`` once per seed.  ``options``: the other fields, shared by every run."""
    sparsities, seeds = list(sparsities), list(seeds)
    return [
        BayesFactorRunConfig(**options, mode=mode, sparsity=r, seed=seed)
        for mode in dict.fromkeys(modes)
        for r in ([None] if mode == "none" else sparsities)
        for seed in seeds
    ]


def bf_run_dir(config: BayesFactorRunConfig) -> Path:
    """``<out_dir>/bf-<model>-<dataset>/`` then ``none/seed<k>`` or
    ``<mode>-<bayes|plain>-r<sparsity>[-spare-output]/seed<k>``."""
    root = Path(config.out_dir) / f"bf-{config.model}-{config.dataset}"
    if config.mode == "none":
        return root / "none" / f"seed{config.seed}"
    spared = "-spare-output" if config.spare_output else ""
    return root / f"{config.mode}-{'bayes' if config.gated else 'plain'}-r{config.sparsity:g}{spared}" / f"seed{config.seed}"


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        return x.item()
    return x


def run_bayes_factor(config: BayesFactorRunConfig, *, data_cache: dict | None = None) -> dict[str, Any]:
    """Train, prune and test one run in :func:`bf_run_dir`; returns its summary (summary.json).

    The run directory gets ``history.json`` (:func:`train_bayes_factor`'s history), ``curves.png``
    and ``summary.json``; while it trains, ``checkpoint.pt`` (removed once summary.json exists).
    A run whose summary.json exists is not run again (its summary is returned); an interrupted one
    resumes after the last epoch of its checkpoint.  ``data_cache``: a dict kept across calls so
    that each (data set, data folder, seed) is loaded once.  The run directory is locked while
    the run trains (rundir.held_run_dir), as a BMRS run's is.
    """
    from .training import _device

    cfg = config
    device = _device(cfg.device)
    d = bf_run_dir(cfg)
    summary_path = d / "summary.json"
    if summary_path.exists():
        print(f"skip {d} (summary.json exists)")
        return files.read_json(summary_path)
    with files.held_run_dir(d):  # a second process on this run is refused (rundir.RunLockedError)
        if summary_path.exists():  # finished by another process while this one waited to start
            return files.read_json(summary_path)
        return _train_and_summarise(cfg, d, device, data_cache)


def _train_and_summarise(cfg: "BayesFactorRunConfig", d: Path, device, data_cache: dict | None) -> dict[str, Any]:
    from .data import load_dataset
    from .models import build_model
    from .results import plot_bf_history

    summary_path = d / "summary.json"
    cache = {} if data_cache is None else data_cache
    key = (cfg.dataset, cfg.data_dir, cfg.seed)
    if key not in cache:
        cache[key] = load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed)
    splits = cache[key]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.in_channels, splits.image_size, splits.num_classes).to(device)
    pruner = None
    if cfg.mode != "none":
        layers = list(prunable_weights(model))
        pruner = BayesFactorPruner(
            model, modules=layers[:-1] if cfg.spare_output else None,
            mode=cfg.mode, sparsity=cfg.sparsity, beta=cfg.beta, gated=cfg.gated, prior_mean=cfg.prior_mean,
            prior_std=cfg.prior_std, likelihood_batches=cfg.likelihood_batches,
            first_log_bf=cfg.first_log_bf, steps=cfg.steps, on_skip=cfg.on_skip, seed=cfg.seed,
        )
    t0 = time.time()
    checkpoint = d / "checkpoint.pt"
    if checkpoint.exists():
        print(f"resume {d} from its checkpoint", flush=True)
    hist = train_bayes_factor(model, splits, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                              pruner=pruner, device=device, progress=not cfg.quiet, seed=cfg.seed,
                              checkpoint=checkpoint)
    earlier_s = sum(hist["seconds"][: hist["resumed_from_epoch"]])  # epochs run before an interruption
    dead = count_dead_structures(model)
    hist = _jsonable(hist)
    files.write_json(d / "history.json", hist, indent=1)
    summary = dict(
        kind="bayes_factor",
        model=cfg.model,
        dataset=cfg.dataset,
        mode=cfg.mode,
        gated=bool(cfg.gated) if cfg.mode != "none" else False,
        sparsity=cfg.sparsity if cfg.sparsity is not None else 0.0,
        seed=cfg.seed,
        test_acc=hist["test_acc"],
        test_loss=hist["test_loss"],
        final_sparsity=hist["sparsity"][-1] if hist["sparsity"] else 0.0,
        prune_events=int(sum(bool(p) for p in hist["pruned"])),
        final_log_bf=hist["log_bf"][-1] if hist["log_bf"] else math.nan,
        dead_structures=dead["dead"],
        structures=dead["total"],
        dead_per_layer=dead["per_layer"],
        wall_time_s=time.time() - t0 + earlier_s,
        resumed_from_epoch=hist["resumed_from_epoch"],
        config=files.recorded(asdict(cfg)),
    )
    title = (f"{cfg.model}/{cfg.dataset} {cfg.mode}"
             + ("" if cfg.mode == "none" else f" {'Bayes' if cfg.gated else 'plain'} r={cfg.sparsity:g}")
             + f" seed {cfg.seed}")
    plot_bf_history(hist, d / "curves.png", title=title)
    files.write_json(summary_path, summary)
    checkpoint.unlink(missing_ok=True)  # finished: summary.json and history.json hold the run
    return summary
