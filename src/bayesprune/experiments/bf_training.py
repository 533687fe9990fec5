"""The Bayes-factor training loop (Mathew and Rowe; docs/maths.md section 5): Adam on an ordinary
network with :class:`bayesprune.bayes_factor.BayesFactorPruner` at the end of every epoch, with
per-epoch checkpoints from which an interrupted run resumes exactly."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..bayes_factor import (LIKELIHOOD_BATCH_SIZE, BayesFactorPruner, _model_device, count_dead_structures,
                            prunable_weights, shrink_dead)
from .training import load_checkpoint, save_checkpoint

__all__ = ["train_bayes_factor"]

def _evaluate(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[float, float]:
    was_training = model.training
    model.eval()
    loss = 0.0
    correct = 0
    n = 0
    try:
        with torch.no_grad():
            for batch in loader:
                x, y = batch[0].to(device), batch[1].to(device)
                logits = model(x)
                loss += float(F.cross_entropy(logits.double(), y, reduction="sum").item())
                correct += int((logits.argmax(dim=1) == y).sum().item())
                n += int(y.shape[0])
    finally:
        model.train(was_training)
    if n == 0:
        return math.nan, math.nan
    return loss / n, correct / n


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
    g = torch.Generator().manual_seed(seed)
    train_loader = DataLoader(splits.train, batch_size=batch_size, shuffle=True, generator=g, num_workers=num_workers)
    val_loader = DataLoader(splits.val, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers)
    test_loader = DataLoader(splits.test, batch_size=eval_batch_size, shuffle=False, num_workers=num_workers)
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
        model.train()
        total, n = 0.0, 0
        for batch in train_loader:
            x, y = batch[0].to(dev), batch[1].to(dev)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()  # the pruner's post-step hook re-zeroes pruned weights
            total += float(loss.item()) * int(y.shape[0])
            n += int(y.shape[0])
        record = pruner.end_of_epoch(epoch, optimizer=optimizer) if pruner is not None else None
        val_loss, val_acc = _evaluate(model, val_loader, dev)
        zeros = {name: float((w.detach() == 0).float().mean().item()) for name, w in weights.items()}
        numel = sum(w.numel() for w in weights.values())
        history["epoch"].append(epoch)
        history["train_loss"].append(total / max(1, n))
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
    test_loss, test_acc = _evaluate(model, test_loader, dev)
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
