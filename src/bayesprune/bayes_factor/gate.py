"""The Bayes-factor gate (Algorithms 1 and 2 of Mathew and Rowe; docs/maths.md section 5): at the
end of every epoch, if the Bayes factor of the last pruning step exceeds ``beta``, prune to the
target sparsity and compute the new one from the two log posteriors::

    log BF = log p(w_after | D) - log p(w_before | D)
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .masks import WeightMasks, _check_sparsity, magnitude_prune, random_prune
from .posterior import LIKELIHOOD_BATCH_SIZE, _as_batches, fixed_batches, log_posterior

__all__ = ["MODES", "SKIP_POLICIES", "BayesFactorPruner"]

#: Pruning modes of :class:`BayesFactorPruner`.
MODES: tuple[str, ...] = ("random", "magnitude")
#: What the stored log BF becomes when the gate is closed (see :class:`BayesFactorPruner`).
SKIP_POLICIES: tuple[str, ...] = ("unit", "keep", "trial")


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
