"""Dead structures of an unstructured-pruned network: neurons (Linear rows) and filters (Conv output
channels) whose incoming weights are all zero, counted and physically removed with their constant
output folded into the consumers' biases (docs/bayes_factor.md)."""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch
from torch import nn

from ..noise import add_noise, noise_layers
from ..removal import _eval_outputs, count_parameters, shrink
from .masks import prunable_weights
from .posterior import _model_device

__all__ = ["SHRINK_DEAD_RTOL", "count_dead_structures", "shrink_dead"]


def _dead_rows(w: torch.Tensor) -> list[int]:
    """Indices of the output structures (rows of the flattened weight) whose weights are all 0."""
    rows = w.detach().reshape(w.shape[0], -1)
    return torch.nonzero((rows == 0).all(dim=1)).flatten().tolist()


def count_dead_structures(model: nn.Module, modules: Iterable[str | nn.Module] | None = None) -> dict[str, Any]:
    """Whole neurons (Linear rows) / filters (Conv output channels) whose incoming weights are all 0.

    Only these turn unstructured sparsity into removable structure: such a unit outputs a
    constant (its bias through the activation), which can be folded into the next layer's bias.
    Returns ``{"per_layer": {name: {"dead": k, "total": n}}, "dead": K, "total": N}``.
    """
    per_layer: dict[str, dict[str, int]] = {}
    for name, w in prunable_weights(model, modules).items():
        per_layer[name] = {"dead": len(_dead_rows(w)), "total": int(w.shape[0])}
    return {
        "per_layer": per_layer,
        "dead": sum(v["dead"] for v in per_layer.values()),
        "total": sum(v["total"] for v in per_layer.values()),
    }


#: Relative tolerance (of the output scale) of :func:`shrink_dead`'s output checks.
SHRINK_DEAD_RTOL = 1e-5


def _capture(model: nn.Module, names: list[str], inputs: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Eval outputs of the named modules and of the model, in float64-comparable form."""
    out: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(mod, args, res, n=n):
            out[n] = res.detach()
        handles.append(model.get_submodule(n).register_forward_hook(hook))
    try:
        (y,) = _eval_outputs(model, inputs)
    finally:
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
            trial = shrink(trial_in, example_inputs=example_inputs, fold=False).eval()
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


