"""Physical removal of pruned structures: a smaller dense network (issue 4).

``shrink(model, example_inputs)`` copies the model, folds ``E[theta] * mask`` of every noise
layer into adjacent weights, drops the noise modules, and removes masked structures with
Torch-Pruning's dependency graph, which also removes what is coupled to them: BatchNorm
entries, the next layers' input weights (through flatten), and channels tied across residual
additions and concatenations.  A coupled channel is removed only when *every* coupled layer
masks it; otherwise it stays, zeroed by the fold, so outputs are unchanged.

Folding (theta > 0 is a per-structure scale):
* noise after the layer or after its BatchNorm: scale that module's weight and bias;
* noise after a positively homogeneous activation (ReLU, LeakyReLU, PReLU): f(t z) = t f(z), so
  scale the module before the activation;
* noise after any other activation (Tanh, GELU, ...): scale the consumers' input weights.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from .noise import _BN_TYPES, noise_layers, remove_noise

__all__ = ["shrink", "count_parameters", "remaining_parameters"]

_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)


def count_parameters(model: nn.Module) -> int:
    """Parameters of the network, not counting noise parameters."""
    return sum(p.numel() for n, p in model.named_parameters() if "bayes_noise" not in n)


def _example(model, example_inputs):
    if example_inputs is None:
        example_inputs = getattr(model, "bayes_example_inputs", None)
    if example_inputs is None:
        raise ValueError(
            "example_inputs is needed to trace the network's dependencies; pass a small input batch "
            "(or give it to add_noise(model, example_inputs), which remembers it)"
        )
    return example_inputs


def _out_pruner(module):
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return tp.prune_conv_out_channels
    raise TypeError(f"cannot remove output structures of {type(module).__name__}")


def _scale_rows(module: nn.Module, scale: torch.Tensor) -> None:
    shape = (-1,) + (1,) * (module.weight.ndim - 1)
    module.weight.mul_(scale.to(module.weight.dtype).view(shape))
    if getattr(module, "bias", None) is not None:
        module.bias.mul_(scale.to(module.bias.dtype))


def _fold_into_bn(bn: nn.Module, scale: torch.Tensor) -> None:
    if not bn.affine:
        raise NotImplementedError(f"cannot fold the noise into a non-affine {type(bn).__name__}")
    bn.weight.mul_(scale.to(bn.weight.dtype))
    bn.bias.mul_(scale.to(bn.bias.dtype))


def _build_graph(model, example_inputs):
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
                return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was_training)


@torch.no_grad()
def shrink(model: nn.Module, example_inputs=None, fold: bool = True) -> nn.Module:
    """A plain ``nn.Module`` without noise layers and without the masked structures.

    Its eval output equals the masked model's eval output (``fold=True``).  ``fold=False`` only
    removes structures (used to count parameters).  The input model is left untouched.
    """
    example_inputs = _example(model, example_inputs)
    m = copy.deepcopy(model)
    layers = noise_layers(m)
    if not layers:
        raise ValueError("model has no noise layers: nothing to shrink (call bayesprune.add_noise first)")
    info = []  # (layer module, mask, chain modules, scale)
    for noise in layers:
        noise.check_finite()
        layer = m.get_submodule(noise.layer_name)
        chain = [m.get_submodule(n) for n in (noise.chain or [noise.layer_name])]
        scale = (noise.expected_theta().double() * noise.mask.double()).detach()
        info.append((layer, noise.mask.detach().clone(), chain, scale))
    remove_noise(m)
    graph = _build_graph(m, example_inputs)
    if fold:
        for layer, _, chain, scale in info:
            target = chain[-1]
            if target is layer:
                _scale_rows(layer, scale)
            elif isinstance(target, _BN_TYPES):
                _fold_into_bn(target, scale)
            elif isinstance(target, _HOMOGENEOUS):
                producer = chain[-2]
                if isinstance(producer, _BN_TYPES):
                    _fold_into_bn(producer, scale)
                else:
                    _scale_rows(producer, scale)
            else:
                _fold_into_consumers(graph, layer, scale)
    masks = {id(layer): mask for layer, mask, _, _ in info}
    for layer, _, _, _ in info:
        _remove_masked(graph, layer, masks)
    return m


def _fold_into_consumers(graph, layer, scale) -> None:
    fn = _out_pruner(layer)
    for i in range(len(scale)):
        group = graph.get_pruning_group(layer, fn, idxs=[i])
        found = False
        for dep, idxs in group:
            mod = dep.target.module
            if dep.handler in (tp.prune_linear_in_channels, tp.prune_conv_in_channels) and mod is not layer:
                idx = torch.as_tensor(list(idxs), dtype=torch.long)
                w = mod.weight
                w[:, idx] = w[:, idx] * scale[i].to(w.dtype)
                found = True
        if not found:
            raise NotImplementedError(
                "noise after a non-homogeneous activation whose output feeds no Linear/Conv layer cannot be folded"
            )


def _remove_masked(graph, layer, masks) -> None:
    mask = masks[id(layer)]
    removed = torch.nonzero(mask == 0).flatten().tolist()
    if not removed:
        return
    fn = _out_pruner(layer)

    def coupled_ok(group, root_idx_count):
        ok = [True] * root_idx_count
        for dep, idxs in group:
            mod = dep.target.module
            if mod is layer or dep.handler not in (tp.prune_linear_out_channels, tp.prune_conv_out_channels):
                continue
            idxs = list(idxs)
            other = masks.get(id(mod))
            if len(idxs) != root_idx_count:
                return None
            for k, j in enumerate(idxs):
                if other is None or other[j] != 0:
                    ok[k] = False
        return ok

    group = graph.get_pruning_group(layer, fn, idxs=removed)
    ok = coupled_ok(group, len(removed))
    if ok is None:  # index maps of unequal length: decide one structure at a time
        ok = [all(coupled_ok(graph.get_pruning_group(layer, fn, idxs=[i]), 1) or [False]) for i in removed]
    keep_removing = [i for i, flag in zip(removed, ok) if flag]
    if not keep_removing:
        return
    if len(keep_removing) >= layer.weight.shape[0]:
        keep_removing = keep_removing[1:]  # Torch-Pruning cannot empty a layer; one zeroed unit stays
    group = graph.get_pruning_group(layer, fn, idxs=keep_removing)
    # keep every stored mask aligned with its layer's remaining channels
    for dep, idxs in group:
        mod = dep.target.module
        if id(mod) in masks and dep.handler in (tp.prune_linear_out_channels, tp.prune_conv_out_channels):
            keep = torch.ones(len(masks[id(mod)]), dtype=torch.bool)
            keep[list(idxs)] = False
            masks[id(mod)] = masks[id(mod)][keep]
    group.prune()


def remaining_parameters(model: nn.Module, example_inputs=None) -> int:
    """Parameters left after physically removing the masked structures (noise excluded)."""
    return count_parameters(shrink(model, example_inputs, fold=False))
