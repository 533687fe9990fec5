"""The unnormalised log posterior of an ordinary network (docs/maths.md section 5)::

    log p(w | D) = sum_i log p(y_i | x_i, w) + sum_j log N(w_j; m0, s0^2)   (up to log p(D))

and the fixed likelihood data it is evaluated on.  Everything is in float64 and in log space.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .masks import prunable_weights

__all__ = ["LIKELIHOOD_BATCH_SIZE", "log_likelihood", "log_prior", "log_posterior", "fixed_batches"]

#: Default batch size for likelihood passes over a Dataset (forward only, so larger than training).
LIKELIHOOD_BATCH_SIZE = 256


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def _as_batches(data: Any) -> Iterable:
    """Accept a DataLoader, a Dataset, an iterable of (x, y) batches, or one (x, y) pair."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        return DataLoader(data, batch_size=LIKELIHOOD_BATCH_SIZE, shuffle=False)
    if (
        isinstance(data, tuple)
        and len(data) == 2
        and isinstance(data[0], torch.Tensor)
        and isinstance(data[1], torch.Tensor)
    ):
        return [data]
    return data


def log_likelihood(model: nn.Module, data: Any, device: torch.device | str | None = None) -> float:
    """``sum_i log p(y_i | x_i, w)``: the negative cross-entropy *summed* over ``data``.

    Evaluated in eval mode without gradients; logits are cast to float64 before the
    log-softmax and the sum is accumulated in float64.  The model's training mode is restored.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        with torch.no_grad():
            for batch in _as_batches(data):
                x, y = batch[0], batch[1]
                x = x.to(device)
                y = y.to(device)
                logits = model(x)
                total += -F.cross_entropy(logits.double(), y, reduction="sum")
                count += int(y.shape[0])
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("likelihood data is empty")
    return float(total.item())


def log_prior(weights: Mapping[str, torch.Tensor] | Iterable[torch.Tensor], mean: float = 0.0, std: float = 1.0) -> float:
    """``sum_j log N(w_j; mean, std^2)`` over every entry of the given tensors (zeros included).

    Pruned weights are exactly zero and keep contributing ``log N(0; mean, std^2)``: the pruned
    network is the same parametric model with those weights fixed at zero.
    """
    if not std > 0 or not math.isfinite(std):
        raise ValueError(f"prior std must be positive and finite, got {std!r}")
    tensors = list(weights.values()) if isinstance(weights, Mapping) else list(weights)
    const = -0.5 * math.log(2.0 * math.pi * std * std)
    total = 0.0
    with torch.no_grad():
        for w in tensors:
            d = w.detach().double() - mean
            total += float((const * d.numel() - 0.5 * (d * d).sum() / (std * std)).item())
    return total


def log_posterior(
    model: nn.Module,
    data: Any,
    prior_mean: float = 0.0,
    prior_std: float = 1.0,
    device: torch.device | str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> float:
    """Unnormalised log posterior ``log p(D|w) + log p(w)`` (float64, eval mode, no grad).

    The likelihood is the summed (not averaged) negative cross-entropy over ``data`` (a
    DataLoader, Dataset, iterable of (x, y) batches, or one (x, y) pair).  The Gaussian prior
    ``N(prior_mean, prior_std^2)`` covers the prunable weights only (``weights``, default
    :func:`prunable_weights`): biases, BatchNorm and other parameters are never pruned, so their
    prior terms are identical before and after pruning and cancel in the Bayes factor.
    """
    if weights is None:
        weights = prunable_weights(model)
    return log_likelihood(model, data, device=device) + log_prior(weights, prior_mean, prior_std)


def fixed_batches(
    dataset: Dataset, num_batches: int, batch_size: int = LIKELIHOOD_BATCH_SIZE, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed random subset of ``num_batches`` batches of ``dataset``, materialised once.

    Using the same subset before and after pruning and in every epoch keeps the log Bayes
    factors comparable across epochs.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    g = torch.Generator().manual_seed(seed)
    n = min(len(dataset), num_batches * batch_size)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    loader = DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=batch_size, shuffle=False)
    return [(b[0], b[1]) for b in loader]
