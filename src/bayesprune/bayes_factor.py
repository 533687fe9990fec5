"""Bayes-factor gated weight pruning (Mathew and Rowe; docs/maths.md section 5).

Unstructured (weight-level) pruning of an ordinary network during training.  At the end of every
epoch, if the Bayes factor of the *last* pruning step exceeds a threshold ``beta``, the weights of
every prunable layer are pruned to the target sparsity ``r`` (randomly or by magnitude), and the
new Bayes factor of the pruned against the unpruned network is computed from the two log
posteriors::

    log p(w | D) = sum_i log p(y_i | x_i, w) + sum_j log N(w_j; m0, s0^2)   (up to log p(D))
    log BF       = log p(w_after | D) - log p(w_before | D)

Everything is kept in log space (``exp`` of a difference of summed log-likelihoods overflows).
The defaults the paper leaves open are documented in ``docs/bayes_factor.md``.

Public API
----------
``prunable_weights``, ``log_likelihood``, ``log_prior``, ``log_posterior``, ``WeightMasks``,
``random_prune``, ``magnitude_prune``, ``BayesFactorPruner``, ``count_dead_structures``,
``shrink_dead`` (the training loop is ``bayesprune.experiments.bf_training``).
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset


__all__ = [
    "PRUNABLE_TYPES",
    "MODES",
    "SKIP_POLICIES",
    "prunable_weights",
    "log_likelihood",
    "log_prior",
    "log_posterior",
    "WeightMasks",
    "random_prune",
    "magnitude_prune",
    "BayesFactorPruner",
    "count_dead_structures",
    "shrink_dead",
    "fixed_batches",
]

#: Layer types whose ``weight`` is prunable.
PRUNABLE_TYPES: tuple[type, ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Pruning modes of :class:`BayesFactorPruner`.
MODES: tuple[str, ...] = ("random", "magnitude")
#: What the stored log BF becomes when the gate is closed (see :class:`BayesFactorPruner`).
SKIP_POLICIES: tuple[str, ...] = ("unit", "keep", "trial")

#: Default batch size for likelihood passes over a Dataset (forward only, so larger than training).
LIKELIHOOD_BATCH_SIZE = 256


# ---------------------------------------------------------------------------------------------
# prunable weights
# ---------------------------------------------------------------------------------------------
def prunable_weights(model: nn.Module, modules: Iterable[str | nn.Module] | None = None) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of the model's Linear/Conv layers, keyed by qualified module name.

    ``modules`` optionally restricts the selection: an iterable of module names (as in
    ``model.named_modules()``) or module objects, each of which must be a Linear/Conv layer.
    Biases, BatchNorm and noise parameters are never prunable.  Raises ``ValueError`` when the
    selection is empty.
    """
    named = {name: m for name, m in model.named_modules()}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    if modules is None:
        items = [(n, m) for n, m in named.items() if isinstance(m, PRUNABLE_TYPES)]
    else:
        by_id = {id(m): n for n, m in named.items()}
        items = []
        for sel in modules:
            if isinstance(sel, str):
                if sel not in named:
                    raise ValueError(f"model has no module named {sel!r}")
                items.append((sel, named[sel]))
            elif isinstance(sel, nn.Module):
                if id(sel) not in by_id:
                    raise ValueError(f"module {type(sel).__name__} is not part of the model")
                items.append((by_id[id(sel)], sel))
            else:
                raise TypeError(f"modules must hold names or nn.Module objects, got {type(sel).__name__}")
        for n, m in items:
            if not isinstance(m, PRUNABLE_TYPES):
                raise ValueError(
                    f"module {n!r} is a {type(m).__name__}; prunable layers are "
                    + ", ".join(t.__name__ for t in PRUNABLE_TYPES)
                )
    for n, m in items:
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and id(w) not in seen:  # shared weights counted once
            seen.add(id(w))
            out[n] = w
    if not out:
        raise ValueError(
            f"{type(model).__name__} has no prunable weights (no "
            + "/".join(t.__name__ for t in PRUNABLE_TYPES)
            + " layers selected)"
        )
    return out


# ---------------------------------------------------------------------------------------------
# log posterior
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------
def _check_sparsity(r: Any) -> float:
    try:
        r = float(r)
    except (TypeError, ValueError):
        raise ValueError(f"sparsity must be a number in [0, 1), got {r!r}") from None
    if not (0.0 <= r < 1.0):
        hint = " (a fraction, not a percentage)" if 1.0 <= r <= 100.0 else ""
        raise ValueError(f"sparsity must be in [0, 1){hint}, got {r!r}")
    return r


class WeightMasks:
    """A 0/1 mask per prunable weight; pruned weights stay exactly zero.

    * ``apply(optimizer=None)`` multiplies every weight by its mask (and, if an optimizer is
      given, zeros the pruned entries of its per-parameter state tensors, e.g. Adam's moments).
      Call it after every ``optimizer.step()`` -- or call ``attach(optimizer)`` once, which
      registers a step post-hook doing exactly that.  Re-zeroing after the step is what keeps
      Adam from resurrecting pruned weights (its moment estimates move them even at zero grad).
    * With ``hooks=True`` (default) a gradient hook also zeros the gradients of pruned entries.

    Masks are bool tensors on the weights' device, updated in place.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        modules: Iterable[str | nn.Module] | None = None,
        weights: Mapping[str, nn.Parameter] | None = None,
        hooks: bool = True,
    ) -> None:
        if weights is None:
            if model is None:
                raise ValueError("WeightMasks needs a model or a weights mapping")
            weights = prunable_weights(model, modules)
        elif not weights:
            raise ValueError("WeightMasks needs at least one weight")
        self.weights: dict[str, nn.Parameter] = dict(weights)
        self.masks: dict[str, torch.Tensor] = {
            n: torch.ones_like(w, dtype=torch.bool) for n, w in self.weights.items()
        }
        self._hook_handles: list[Any] = []
        self._optimizer_handles: list[Any] = []
        if hooks:
            self.register_gradient_hooks()

    # -- bookkeeping ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.weights)

    def names(self) -> list[str]:
        return list(self.weights)

    def mask(self, name: str) -> torch.Tensor:
        """The mask of layer ``name``, moved to its weight's device if the model moved."""
        m = self.masks[name]
        w = self.weights[name]
        if m.device != w.device:
            m = m.to(w.device)
            self.masks[name] = m
        return m

    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        w = self.weights[name]
        if mask.shape != w.shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, weight {tuple(w.shape)}")
        self.masks[name] = mask.to(device=w.device, dtype=torch.bool).clone()

    # -- enforcement ------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Zero the pruned weights (and the pruned entries of ``optimizer``'s state)."""
        for name, w in self.weights.items():
            m = self.mask(name)
            w.mul_(m.to(w.dtype))
            if optimizer is not None:
                state = optimizer.state.get(w)
                if state:
                    for value in state.values():
                        if isinstance(value, torch.Tensor) and value.shape == w.shape:
                            value.mul_(m.to(value.dtype))

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Register a post-step hook on ``optimizer`` that calls ``apply(optimizer)``."""
        handle = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.apply(opt))
        self._optimizer_handles.append(handle)
        return handle

    def register_gradient_hooks(self) -> None:
        if self._hook_handles:
            return
        for name, w in self.weights.items():
            self._hook_handles.append(w.register_hook(self._grad_hook(name)))

    def _grad_hook(self, name: str):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            return grad * self.mask(name).to(grad.dtype)

        return hook

    def remove_hooks(self) -> None:
        """Remove gradient hooks and optimizer post-step hooks."""
        for h in self._hook_handles + self._optimizer_handles:
            h.remove()
        self._hook_handles.clear()
        self._optimizer_handles.clear()

    # -- statistics -------------------------------------------------------------------------
    def sparsity(self) -> dict[str, float]:
        """Per-layer fraction of pruned (mask 0) entries."""
        return {n: 1.0 - float(self.mask(n).float().mean().item()) for n in self.weights}

    def weight_sparsity(self) -> dict[str, float]:
        """Per-layer fraction of weights that are exactly zero (equals ``sparsity`` once applied)."""
        return {n: float((w.detach() == 0).float().mean().item()) for n, w in self.weights.items()}

    def num_pruned(self) -> int:
        return sum(int((~self.mask(n)).sum().item()) for n in self.weights)

    def numel(self) -> int:
        return sum(w.numel() for w in self.weights.values())

    def global_sparsity(self) -> float:
        return self.num_pruned() / max(1, self.numel())

    def global_weight_sparsity(self) -> float:
        zeros = sum(int((w.detach() == 0).sum().item()) for w in self.weights.values())
        return zeros / max(1, self.numel())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: self.mask(n).detach().cpu().clone() for n in self.weights}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = set(self.weights) - set(state)
        if missing:
            raise KeyError(f"mask state lacks layers: {sorted(missing)}")
        for n in self.weights:
            self.set_mask(n, state[n])


def _prune_counts(masks: WeightMasks, r: float):
    """Per layer: (name, weight, remaining bool mask, number of extra weights to prune)."""
    for name, w in masks.weights.items():
        remaining = masks.mask(name) & (w.detach() != 0)  # the paper's "non-zero weights"
        n = w.numel()
        target_zeros = int(round(n * r))
        extra = target_zeros - (n - int(remaining.sum().item()))
        yield name, w, remaining, max(0, extra)


@torch.no_grad()
def random_prune(masks: WeightMasks, r: float, generator: torch.Generator | None = None) -> dict[str, int]:
    """Per layer, zero a random subset of the remaining non-zero weights so the sparsity becomes r.

    A layer's sparsity counts every zero entry (masked or exactly zero); the number pruned is
    ``round(n r) - zeros`` (nothing when the layer is already at or above r), so afterwards each
    layer's sparsity is r to within one weight.  ``generator`` is a CPU ``torch.Generator``.
    Updates the masks, zeros the weights, returns the number newly pruned per layer.
    """
    r = _check_sparsity(r)
    pruned: dict[str, int] = {}
    for name, w, remaining, k in _prune_counts(masks, r):
        flat = remaining.flatten().clone()
        if k > 0:
            idx = flat.nonzero().flatten()
            choice = torch.randperm(idx.numel(), generator=generator)[:k].to(idx.device)
            flat[idx[choice]] = False
        masks.set_mask(name, flat.view_as(w))
        pruned[name] = k
    masks.apply()
    return pruned


@torch.no_grad()
def magnitude_prune(masks: WeightMasks, r: float) -> dict[str, int]:
    """Per layer, zero the smallest-|w| remaining weights so the layer's sparsity becomes r."""
    r = _check_sparsity(r)
    pruned: dict[str, int] = {}
    for name, w, remaining, k in _prune_counts(masks, r):
        flat = remaining.flatten().clone()
        if k > 0:
            scores = w.detach().abs().flatten().double()
            scores = torch.where(flat, scores, torch.full_like(scores, math.inf))
            idx = torch.topk(scores, k, largest=False).indices
            flat[idx] = False
        masks.set_mask(name, flat.view_as(w))
        pruned[name] = k
    masks.apply()
    return pruned


# ---------------------------------------------------------------------------------------------
# likelihood data
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# the pruner
# ---------------------------------------------------------------------------------------------
class BayesFactorPruner:
    """Per-epoch Bayes-factor gated pruning (Algorithms 1 and 2 of Mathew and Rowe).

    Parameters
    ----------
    model : the network (any ``nn.Module`` with Linear/Conv layers).
    mode : ``"random"`` or ``"magnitude"``.
    sparsity : target per-layer sparsity r in [0, 1).
    beta : Bayes-factor threshold >= 0 (``inf`` never prunes, ``0`` always prunes).  Default 1:
        "the pruned network fits the data at least as well" (BF > 1).
    gated : ``False`` gives the non-Bayesian baselines (prune every epoch, no test).
    prior_mean, prior_std : the Gaussian prior N(m0, s0^2) on every prunable weight (0, 1).
    likelihood_data : DataLoader, Dataset, or list of (x, y) batches for ``log p(D|w)``; can be
        set later with :meth:`set_likelihood_data` (``train_bayes_factor`` uses the training set).
    likelihood_batches : if given, use a fixed random subset of that many batches (for speed).
    first_log_bf : log BF assumed before any pruning; ``+inf`` (default) so the first epoch prunes.
    persistent : ``True`` (default) keeps pruned weights at zero for the rest of training (masks
        re-applied after every optimizer step).  ``False`` applies the mask only when pruning
        (``w_new = w_old * m``, the paper's Eq. 1) so pruned weights may regrow in later epochs
        and the gate decides whether to prune back to r.
    steps : number of pruning events over which the sparsity target ramps linearly up to r
        (default 1: the paper's one-shot target; > 1 gives the gate something to stop).
    on_skip : what the stored log BF becomes in an epoch where the gate is closed.
        ``"unit"`` (default, Algorithm 1 read literally: nothing was pruned, so the "after"
        posterior equals "before" and BF = 1, log BF = 0); ``"keep"`` (keep the last log BF);
        ``"trial"`` (prune tentatively, compute the log BF that pruning would have had, then
        restore weights and masks -- lets the gate re-open; costs two likelihood passes).
        With ``beta >= 1`` the first two close the gate for good once it closes.
    compute_bf : compute the log BF when pruning (default: ``gated``; the ungated baselines can
        record it for comparison with ``compute_bf=True``).
    modules : optional subset of the layers to prune (names or modules).
    seed : seed of the random-pruning generator and of the fixed likelihood subset.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "random",
        sparsity: float = 0.5,
        beta: float = 1.0,
        gated: bool = True,
        prior_mean: float = 0.0,
        prior_std: float = 1.0,
        likelihood_data: Any = None,
        likelihood_batches: int | None = None,
        likelihood_batch_size: int = LIKELIHOOD_BATCH_SIZE,
        first_log_bf: float = math.inf,
        persistent: bool = True,
        steps: int = 1,
        on_skip: str = "unit",
        compute_bf: bool | None = None,
        modules: Iterable[str | nn.Module] | None = None,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.sparsity = _check_sparsity(sparsity)
        beta = float(beta)
        if math.isnan(beta) or beta < 0:
            raise ValueError(f"beta must be >= 0 (inf never prunes, 0 always prunes), got {beta!r}")
        if not (prior_std > 0 and math.isfinite(prior_std)):
            raise ValueError(f"prior_std must be positive and finite, got {prior_std!r}")
        if not math.isfinite(prior_mean):
            raise ValueError(f"prior_mean must be finite, got {prior_mean!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        if on_skip not in SKIP_POLICIES:
            raise ValueError(f"on_skip must be one of {SKIP_POLICIES}, got {on_skip!r}")
        if likelihood_batches is not None and likelihood_batches < 1:
            raise ValueError(f"likelihood_batches must be >= 1 or None, got {likelihood_batches!r}")
        self.model = model
        self.mode = mode
        self.beta = beta
        self.gated = bool(gated)
        self.prior_mean = float(prior_mean)
        self.prior_std = float(prior_std)
        self.first_log_bf = float(first_log_bf)
        self.log_bf = float(first_log_bf)
        self.persistent = bool(persistent)
        self.steps = steps
        self.on_skip = on_skip
        self.compute_bf = self.gated if compute_bf is None else bool(compute_bf)
        self.seed = seed
        self.device = device
        self.likelihood_batches = likelihood_batches
        self.likelihood_batch_size = likelihood_batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.masks = WeightMasks(model, modules, hooks=self.persistent)
        self.prune_events = 0
        self.history: list[dict[str, Any]] = []
        self.likelihood_data: Any = None
        if likelihood_data is not None:
            self.set_likelihood_data(likelihood_data)

    # -- configuration ----------------------------------------------------------------------
    @property
    def log_beta(self) -> float:
        return -math.inf if self.beta == 0 else math.log(self.beta)

    def set_likelihood_data(self, data: Any) -> None:
        """Set the data of ``log p(D|w)``: a Dataset, DataLoader or iterable of (x, y) batches.

        With ``likelihood_batches = k`` a fixed random subset of k batches is drawn once (from a
        Dataset) or the first k batches are cached (from a loader/iterable).
        """
        k = self.likelihood_batches
        if k is None:
            self.likelihood_data = data
        elif isinstance(data, Dataset) and not isinstance(data, DataLoader):
            self.likelihood_data = fixed_batches(data, k, self.likelihood_batch_size, seed=self.seed)
        else:
            batches = []
            for i, b in enumerate(_as_batches(data)):
                if i >= k:
                    break
                batches.append((b[0], b[1]))
            self.likelihood_data = batches

    def attach(self, optimizer: torch.optim.Optimizer) -> Any:
        """Keep pruned weights at zero after every ``optimizer.step()`` (persistent mode only)."""
        if self.persistent:
            return self.masks.attach(optimizer)
        return None

    def current_target(self) -> float:
        """Sparsity target of the next pruning event (ramps up to r over ``steps`` events)."""
        return self.sparsity * min(1.0, (self.prune_events + 1) / self.steps)

    def should_prune(self) -> bool:
        if not self.gated:
            return True
        if self.beta == 0:
            return True
        if math.isinf(self.beta):
            return False
        return self.log_bf > self.log_beta

    def log_posterior(self, data: Any = None) -> float:
        data = self.likelihood_data if data is None else data
        if data is None:
            raise ValueError(
                "no likelihood data: pass likelihood_data= to BayesFactorPruner, call "
                "set_likelihood_data(), or pass data= to end_of_epoch()"
            )
        return log_posterior(
            self.model, data, self.prior_mean, self.prior_std, device=self.device, weights=self.masks.weights
        )

    def prune_now(self, target: float | None = None) -> dict[str, int]:
        """Prune to ``target`` (default: current target) without any test."""
        target = self.current_target() if target is None else target
        if not self.persistent:
            # Weights pruned earlier may have regrown: the candidates are the non-zero weights now.
            with torch.no_grad():
                for name, w in self.masks.weights.items():
                    self.masks.set_mask(name, w.detach() != 0)
        if self.mode == "random":
            return random_prune(self.masks, target, generator=self.generator)
        return magnitude_prune(self.masks, target)

    def _trial_log_bf(self, data: Any) -> tuple[float, float, float]:
        """log BF of pruning now, without keeping the pruning (weights and masks restored)."""
        saved_w = {n: w.detach().clone() for n, w in self.masks.weights.items()}
        saved_m = self.masks.state_dict()
        before = self.log_posterior(data)
        try:
            n = sum(self.prune_now(self.current_target()).values())
            after = before if n == 0 else self.log_posterior(data)
        finally:
            with torch.no_grad():
                for name, w in self.masks.weights.items():
                    w.copy_(saved_w[name])
            self.masks.load_state_dict(saved_m)
        return after - before, before, after

    # -- the per-epoch step -----------------------------------------------------------------
    def end_of_epoch(self, epoch: int | None = None, data: Any = None, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
        """The paper's end-of-epoch step; returns (and appends to ``history``) a record.

        If the last log BF exceeds log(beta) (or the pruner is ungated): compute the log
        posterior, prune to the target sparsity, compute the log posterior again and store
        ``log_bf = after - before``.  Otherwise nothing is pruned and the stored log BF follows
        ``on_skip`` (default: 0, i.e. BF = 1, as Algorithm 1 gives when "after" equals "before").
        ``optimizer`` (optional) has the pruned entries of its state zeroed as well.
        """
        if epoch is None:
            epoch = len(self.history) + 1
        prune = self.should_prune()
        before = after = math.nan
        new_log_bf = math.nan
        n_pruned = 0
        t0 = time.perf_counter()
        if prune:
            need_bf = self.gated or self.compute_bf
            if need_bf:
                before = self.log_posterior(data)
            target = self.current_target()
            counts = self.prune_now(target)
            n_pruned = sum(counts.values())
            self.prune_events += 1
            if optimizer is not None and self.persistent:
                self.masks.apply(optimizer)
            if need_bf:
                after = before if n_pruned == 0 else self.log_posterior(data)
                new_log_bf = after - before
            if self.gated:
                self.log_bf = new_log_bf
        elif self.gated:
            if self.on_skip == "unit":
                new_log_bf = 0.0
            elif self.on_skip == "keep":
                new_log_bf = self.log_bf
            else:  # trial
                new_log_bf, before, after = self._trial_log_bf(data)
            self.log_bf = new_log_bf
        record = {
            "epoch": epoch,
            "pruned": bool(prune),
            "num_pruned": n_pruned,
            "log_bf": new_log_bf,
            "log_posterior_before": before,
            "log_posterior_after": after,
            "target_sparsity": self.current_target() if not prune else target,
            "layer_sparsity": self.masks.weight_sparsity(),
            "sparsity": self.masks.global_weight_sparsity(),
            "seconds": time.perf_counter() - t0,
        }
        self.history.append(record)
        return record


# ---------------------------------------------------------------------------------------------
# structure
# ---------------------------------------------------------------------------------------------
def count_dead_structures(model: nn.Module, modules: Iterable[str | nn.Module] | None = None) -> dict[str, Any]:
    """Whole neurons (Linear rows) / filters (Conv output channels) whose incoming weights are all 0.

    Only these turn unstructured sparsity into removable structure: such a unit outputs a
    constant (its bias through the activation), which can be folded into the next layer's bias.
    Returns ``{"per_layer": {name: {"dead": k, "total": n}}, "dead": K, "total": N}``.
    """
    per_layer: dict[str, dict[str, int]] = {}
    for name, w in prunable_weights(model, modules).items():
        rows = w.detach().reshape(w.shape[0], -1)
        dead = int((rows == 0).all(dim=1).sum().item())
        per_layer[name] = {"dead": dead, "total": int(w.shape[0])}
    return {
        "per_layer": per_layer,
        "dead": sum(v["dead"] for v in per_layer.values()),
        "total": sum(v["total"] for v in per_layer.values()),
    }


#: Relative tolerance (of the output scale) of :func:`shrink_dead`'s output checks.
SHRINK_DEAD_RTOL = 1e-5


def _dead_rows(w: torch.Tensor) -> list[int]:
    rows = w.detach().reshape(w.shape[0], -1)
    return torch.nonzero((rows == 0).all(dim=1)).flatten().tolist()


def _capture(model: nn.Module, names: list[str], inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Eval outputs of the named modules and of the model, in float64-comparable form."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(mod, args, res, n=n):
            out[n] = res.detach()
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(inputs).detach()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return out, y


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(a.abs().max().item()) if a.numel() else 1.0)
    return a.shape == b.shape and float((a.double() - b.double()).abs().max().item()) <= SHRINK_DEAD_RTOL * scale


@torch.no_grad()
def shrink_dead(model: nn.Module, example_inputs: torch.Tensor, verify_inputs: torch.Tensor | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Physically remove the dead neurons / filters of ``model``; outputs stay the same.

    A structure is *dead* when all its incoming weights are zero (:func:`count_dead_structures`).
    Its output is then a constant ``c = act(bias)`` (whatever follows it: activation, BatchNorm,
    pooling), which the next layers receive as a constant input.  Removing it is exact once that
    constant's contribution is folded into the consumers' biases; this is done (and checked) per
    producer layer, in forward order:

    1. add noise layers (``bayesprune.add_noise(copy, example_inputs, placement="layer")``), set
       this layer's mask to 0 on its dead structures and call ``bayesprune.shrink(copy,
       example_inputs, fold=False)``: pure removal (the consumers lose the matching input
       columns, Torch-Pruning finds them);
    2. compare every Linear/Conv output of the smaller network with the original's on
       ``example_inputs``; the first one that differs must differ by a constant (over the batch
       and, for convolutions, over positions): add it to that layer's bias and repeat until the
       network output matches.  This is exactly ``sum_i W_next[:, i] * c_i`` over the removed
       inputs i;
    3. if some difference is not constant (e.g. a padded convolution consumes the constant: the
       border sees zero padding instead of c), a consumer has no bias, or the output does not
       match, this layer's dead structures are kept (zero rows, not removed).

    The output layer's rows are never removed (``add_noise`` excludes it).  Returns the smaller
    plain model (no noise layers; the input model is untouched) and a report
    ``{"dead_per_layer": {name: {"dead", "total"}}, "removed_per_layer": {name: k},
    "dead", "removed", "params_before", "params_after", "kept_layers": {name: reason}}``.
    """
    from .noise import add_noise, noise_layers
    from .removal import count_parameters, shrink

    if not isinstance(example_inputs, torch.Tensor):
        raise TypeError("shrink_dead needs example_inputs as one input tensor (a small batch)")
    x = example_inputs if verify_inputs is None else torch.cat([example_inputs, verify_inputs])
    current = copy.deepcopy(model).eval()
    dev = _model_device(current)
    x = x.to(dev)
    names = list(prunable_weights(current))
    ref_layers, ref_out = _capture(current, names, x)
    dead = count_dead_structures(current)
    report: dict[str, Any] = {
        "dead_per_layer": dead["per_layer"],
        "dead": dead["dead"],
        "removed_per_layer": {n: 0 for n in names},
        "removed": 0,
        "params_before": count_parameters(current),
        "params_after": count_parameters(current),
        "kept_layers": {},
    }
    noisy_names = [nl.layer_name for nl in noise_layers(add_noise(copy.deepcopy(current), example_inputs, placement="layer"))]
    for name in noisy_names:
        rows = _dead_rows(current.get_submodule(name).weight)
        if not rows:
            continue
        trial_in = add_noise(copy.deepcopy(current), example_inputs, placement="layer")
        for nl in noise_layers(trial_in):
            if nl.layer_name == name:
                nl.mask[rows] = 0.0
        try:
            trial = shrink(trial_in, example_inputs, fold=False).eval()
        except Exception as e:  # pragma: no cover - depends on Torch-Pruning's coverage
            report["kept_layers"][name] = f"removal failed: {type(e).__name__}: {e}"
            continue
        removed_idx = sorted({i for step in trial.bayesprune_pruning["steps"] if step[0] == name for i in step[2]})
        if not removed_idx:
            report["kept_layers"][name] = "Torch-Pruning removed nothing"
            continue
        # current's own layer outputs (the kept rows must match), then the consumers' biases
        cur_layers, cur_out = _capture(current, names, x)
        keep = torch.ones(current.get_submodule(name).weight.shape[0], dtype=torch.bool)
        keep[removed_idx] = False
        why = None
        for _ in range(len(names) + 1):
            lay, out = _capture(trial, names, x)
            bad = None
            for n in names:
                a = cur_layers[n][:, keep.to(cur_layers[n].device)] if n == name else cur_layers[n]
                if not _close(a, lay[n]):
                    bad = n
                    break
            if bad is None:
                break
            if bad == name:
                why = f"{name}'s kept outputs changed"
                break
            diff = (cur_layers[bad].double() - lay[bad].double())
            if diff.shape != lay[bad].shape:
                why = f"{bad}'s output shape changed"
                break
            per = diff.transpose(0, 1).reshape(diff.shape[1], -1)  # (channels, batch * positions)
            const = per.mean(dim=1)
            scale = max(1.0, float(cur_layers[bad].abs().max().item()))
            if float((per - const[:, None]).abs().max().item()) > SHRINK_DEAD_RTOL * scale:
                why = f"the constant does not fold into {bad} (not constant over inputs/positions, e.g. zero padding)"
                break
            mod = trial.get_submodule(bad)
            if getattr(mod, "bias", None) is None:
                why = f"{bad} has no bias to fold the constant into"
                break
            mod.bias.add_(const.to(mod.bias.dtype))
        else:  # pragma: no cover
            why = "did not converge"
        if why is None and not _close(cur_out, out):
            why = "network output changed"
        if why is not None:
            report["kept_layers"][name] = why
            continue
        for attr in ("bayesprune_pruning", "bayes_example_inputs"):
            if hasattr(trial, attr):
                delattr(trial, attr)
        current = trial
        report["removed_per_layer"][name] = len(removed_idx)
    _, final_out = _capture(current, names, x)
    if not _close(ref_out, final_out):  # pragma: no cover - each step was checked
        raise RuntimeError("shrink_dead changed the network output")
    report["removed"] = sum(report["removed_per_layer"].values())
    report["params_after"] = count_parameters(current)
    current.train(model.training)
    return current, report


