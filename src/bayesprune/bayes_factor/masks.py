"""Which weights are prunable, and which are pruned: per-layer 0/1 masks and the two ways of
filling them (random and magnitude pruning to a per-layer sparsity r; docs/maths.md section 5)."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..selection import PRUNABLE_TYPES, prunable_weight_layers

__all__ = ["prunable_weights", "WeightMasks", "random_prune", "magnitude_prune"]


def prunable_weights(model: nn.Module, modules: Iterable[str | nn.Module] | None = None) -> dict[str, nn.Parameter]:
    """The ``weight`` parameters of the model's Linear/Conv layers, keyed by qualified module name.

    ``modules`` optionally restricts the selection: an iterable of module names (as in
    ``model.named_modules()``) or module objects, each of which must be a Linear/Conv layer.
    Biases, BatchNorm and noise parameters are never prunable.  Raises ``ValueError`` when the
    selection is empty.
    """
    named = dict(model.named_modules())
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    items = [(n, named[n]) for n in prunable_weight_layers(model, modules)]  # checked there
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
