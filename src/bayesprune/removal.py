"""Physical removal of pruned structures: a smaller dense network (issue 4).

``shrink(model, example_inputs)`` copies the model, folds ``E[theta] * mask`` of every noise
layer into adjacent weights, drops the noise modules, and removes masked structures with
Torch-Pruning's dependency graph, which also removes what is coupled to them: BatchNorm
entries, the next layers' input weights (through flatten), and channels tied across residual
additions and concatenations.  ``shrink_for_training`` removes the same structures but keeps
the noise layers (sliced to the kept structures) and folds nothing, so training can go on.

Folding rule (theta > 0 is a per-structure scale):

* noise after the layer or after its BatchNorm: scale that module's weight and bias;
* noise after a positively homogeneous activation (ReLU, LeakyReLU, PReLU): f(t z) = t f(z), so
  scale the module before the activation;
* noise after any other activation (Tanh, GELU, ...): scale the consumers' input weights.

Removal rule: structure i of a layer is removed when its mask is 0 and every Linear/Conv
output coupled to it (residual additions, concatenations) is masked too; a coupled channel
that some layer keeps stays (zeroed where masked, by the fold), so outputs are unchanged.
Channels coupled to a LayerNorm/GroupNorm (which normalises across them) are never removed.

Safety net: the result is run on a random probe shaped like ``example_inputs`` and compared
with the masked model's eval output.  If it differs (e.g. removing q/k/v features breaks an
attention reshape that Torch-Pruning cannot see), removal is retried layer by layer and the
layers whose removal breaks the output keep their structures (zeroed, not removed).

The shrunk model carries ``model.bayesprune_pruning = {"inputs": ..., "steps": ...}``:
the Torch-Pruning history (``[layer name, True, [output indices]]`` per step) that rebuilds it
from the original architecture (used by :mod:`bayesprune.export`).
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import nn

from .noise import _BN_TYPES, PRUNABLE_TYPES, noise_layers, remove_noise

__all__ = ["shrink", "shrink_for_training", "count_parameters", "remaining_parameters", "replay_pruning"]

_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity)
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)
VERIFY_RTOL = 1e-4  # of the output scale; the fold itself is exact up to float rounding


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


def _run(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _probe(example_inputs):
    """Random inputs shaped like ``example_inputs`` (integer tensors, e.g. token ids, kept)."""
    g = torch.Generator().manual_seed(0)

    def rand(x):
        if torch.is_tensor(x) and x.is_floating_point():
            return torch.randn(x.shape, generator=g, dtype=torch.float32).to(dtype=x.dtype, device=x.device)
        return x

    if isinstance(example_inputs, dict):
        return {k: rand(v) for k, v in example_inputs.items()}
    if isinstance(example_inputs, (tuple, list)):
        return type(example_inputs)(rand(v) for v in example_inputs)
    return rand(example_inputs)


@torch.no_grad()
def _eval_outputs(model, inputs):
    was = model.training
    model.eval()
    try:
        return [t.detach().clone() for t in _tensors(_run(model, inputs))]
    finally:
        model.train(was)


def _mismatch(reference, model, inputs, values: bool = True) -> str | None:
    """None if ``model`` reproduces ``reference`` on ``inputs`` (only its shapes unless ``values``)."""
    try:
        outs = _eval_outputs(model, inputs)
    except Exception as e:  # a removal that broke a reshape, a concat, ...
        return f"forward pass failed: {type(e).__name__}: {e}"
    if len(outs) != len(reference) or any(a.shape != b.shape for a, b in zip(outs, reference)):
        return "output shapes differ"
    if not values:
        return None
    for a, b in zip(outs, reference):
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        if not diff <= VERIFY_RTOL * max(scale, 1e-12):
            return f"max abs difference {diff:.3g} at output scale {scale:.3g}"
    return None


def _out_pruner(module):
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return tp.prune_conv_out_channels
    raise TypeError(f"cannot remove output structures of {type(module).__name__}")


def _pairs(idxs) -> list[tuple[int, int]]:
    """(index in this module, index in the root layer) for a group item's indices."""
    return [(int(getattr(h, "idx", h)), int(getattr(h, "root_idx", h))) for h in idxs]


def _build_graph(model, example_inputs):
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs, verbose=False)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------
# folding E[theta] * mask into weights


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


def _fold_into_consumers(graph, layer, scale) -> None:
    """Scale the input weights that read structure i (column j of a consumer reads root i)."""
    group = graph.get_pruning_group(layer, _out_pruner(layer), idxs=list(range(len(scale))))
    found = False
    for dep, idxs in group:
        mod = dep.target.module
        if mod is layer or not isinstance(mod, PRUNABLE_TYPES) or graph.is_out_channel_pruning_fn(dep.handler):
            continue
        if getattr(mod, "groups", 1) != 1:
            raise NotImplementedError(f"cannot fold noise into the grouped convolution {mod}")
        cols, roots = torch.tensor(_pairs(idxs), dtype=torch.long).reshape(-1, 2).T
        if len(cols) != len(scale):  # flatten: root i expands to a block of k consecutive columns
            k = len(cols) // len(scale)
            roots = torch.arange(len(scale)).repeat_interleave(k)
        w = mod.weight
        shape = (1, -1) + (1,) * (w.ndim - 2)
        w[:, cols] = w[:, cols] * scale[roots].to(w.dtype).view(shape)
        found = True
    if not found:
        raise NotImplementedError(
            "noise after a non-homogeneous activation whose output feeds no Linear/Conv layer cannot be folded"
        )


def _fold(graph, model, entry) -> None:
    layer = model.get_submodule(entry["layer"])
    chain = [model.get_submodule(n) for n in entry["chain"]]
    target, scale = chain[-1], entry["scale"]
    if target is layer:
        _scale_rows(layer, scale)
    elif isinstance(target, _BN_TYPES):
        _fold_into_bn(target, scale)
    elif isinstance(target, _HOMOGENEOUS):
        producer = chain[-2]
        (_fold_into_bn if isinstance(producer, _BN_TYPES) else _scale_rows)(producer, scale)
    else:
        _fold_into_consumers(graph, layer, scale)


# ---------------------------------------------------------------------------------------------
# removal


def _remove_structures(model, example_inputs, entries, allowed) -> tuple[list, dict]:
    """Remove masked structures of the layers named in ``allowed`` (in place).

    Returns the Torch-Pruning steps and, per noise layer, the original indices that remain.
    """
    graph = _build_graph(model, example_inputs)
    name_of = {id(model.get_submodule(e["layer"])): e["layer"] for e in entries}
    masks = {e["layer"]: e["mask"].clone() for e in entries}
    kept = {e["layer"]: torch.arange(len(e["mask"])) for e in entries}
    steps = []
    for e in entries:
        name = e["layer"]
        removed = torch.nonzero(masks[name] == 0).flatten().tolist()
        if name not in allowed or not removed:
            continue
        layer, fn = model.get_submodule(name), _out_pruner(model.get_submodule(name))
        veto = set()
        for dep, idxs in graph.get_pruning_group(layer, fn, idxs=removed):
            mod = dep.target.module
            if isinstance(mod, _CROSS_CHANNEL_NORMS):
                veto.update(r for _, r in _pairs(idxs))
            elif mod is not layer and isinstance(mod, PRUNABLE_TYPES) and graph.is_out_channel_pruning_fn(dep.handler):
                other = masks.get(name_of.get(id(mod)))
                veto.update(r for i, r in _pairs(idxs) if other is None or other[i] != 0)
        removing = [i for i in removed if i not in veto]
        if len(removing) >= layer.weight.shape[0]:
            removing = removing[1:]  # Torch-Pruning cannot empty a layer; one zeroed unit stays
        if not removing:
            continue
        group = graph.get_pruning_group(layer, fn, idxs=removing)
        for dep, idxs in group:  # keep every stored mask aligned with its layer's remaining outputs
            other = name_of.get(id(dep.target.module))
            if other is not None and graph.is_out_channel_pruning_fn(dep.handler):
                keep = torch.ones(len(masks[other]), dtype=torch.bool)
                keep[[i for i, _ in _pairs(idxs)]] = False
                masks[other], kept[other] = masks[other][keep], kept[other][keep]
        group.prune(record_history=False)
        steps.append([name, True, [int(i) for i in removing]])
    return steps, kept


def replay_pruning(model: nn.Module, example_inputs, steps) -> nn.Module:
    """Apply recorded removal ``steps`` to a fresh copy of the original architecture (in place)."""
    graph = _build_graph(model, example_inputs)
    graph.load_pruning_history([list(s) for s in steps])
    return model


def _input_spec(example_inputs) -> dict:
    """JSON description of the example inputs (enough to rebuild zeros of that shape)."""
    spec = {"inputs": [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
                       for t in _tensors(example_inputs)]}
    if isinstance(example_inputs, dict):
        spec["keys"] = list(example_inputs)
    return spec


def example_from_spec(spec: dict):
    """Zero example inputs from :func:`_input_spec`'s description."""
    xs = [torch.zeros(i["shape"], dtype=getattr(torch, i["dtype"])) for i in spec["inputs"]]
    if "keys" in spec:
        return dict(zip(spec["keys"], xs))
    return xs[0] if len(xs) == 1 else tuple(xs)


def _shrink(model, example_inputs, fold: bool, keep_noise: bool, verify: bool):
    example_inputs = _example(model, example_inputs)
    m = copy.deepcopy(model)
    layers = noise_layers(m)
    if not layers:
        raise ValueError("model has no noise layers: nothing to shrink (call bayesprune.add_noise first)")
    entries = []
    for noise in layers:
        noise.check_finite()
        entries.append({
            "layer": noise.layer_name,
            "chain": list(noise.chain or [noise.layer_name]),
            "mask": noise.mask.detach().clone().cpu(),
            "scale": (noise.expected_theta().double() * noise.mask.double()).detach(),
            "noise": noise,
        })
    probe = _probe(example_inputs)
    reference = _eval_outputs(m, probe) if verify else None
    remove_noise(m)
    if fold:
        graph = None
        for e in entries:
            if graph is None and not isinstance(m.get_submodule(e["chain"][-1]), _HOMOGENEOUS + _BN_TYPES + PRUNABLE_TYPES):
                graph = _build_graph(m, example_inputs)  # only consumer folding needs the graph
            _fold(graph, m, e)
    names = [e["layer"] for e in entries]

    def attempt(allowed):
        trial = copy.deepcopy(m)
        steps, kept = _remove_structures(trial, example_inputs, entries, allowed)
        if keep_noise:
            _reattach(trial, entries, kept)
        why = _mismatch(reference, trial, probe, values=fold or keep_noise) if verify else None
        return trial, steps, why

    out, steps, why = attempt(set(names))
    if why is not None:  # find the layers whose removal breaks the network and keep theirs
        masked = {e["layer"] for e in entries if bool((e["mask"] == 0).any())}
        safe = {n for n in names if n not in masked or attempt({n})[2] is None}
        out, steps, why = attempt(safe)
        if why is not None:
            raise RuntimeError(f"shrink could not reproduce the masked model's eval output ({why})")
    out.train(model.training)
    out.bayesprune_pruning = {**_input_spec(example_inputs), "steps": steps}
    if keep_noise:
        out.bayes_example_inputs = example_inputs
    return out


def _reattach(model, entries, kept) -> None:
    """Put each noise module back on its layer, sliced to the kept structures."""
    for e in entries:
        noise, idx = copy.deepcopy(e["noise"]), kept[e["layer"]]
        n_old = len(e["mask"])
        for mod_name, t in list(noise.named_parameters(recurse=False)) + list(noise.named_buffers(recurse=False)):
            if t.ndim >= 1 and t.shape[0] == n_old:
                new = t.detach()[idx.to(t.device)].clone()
                if isinstance(t, nn.Parameter):
                    setattr(noise, mod_name, nn.Parameter(new, requires_grad=t.requires_grad))
                else:
                    setattr(noise, mod_name, new)
        if hasattr(noise, "num_structures"):
            noise.num_structures = len(idx)
        for attr in ("_cache", "_cache_key"):
            if hasattr(noise, attr):
                setattr(noise, attr, None)
        model.get_submodule(e["layer"]).add_module("bayes_noise", noise)
        noise._handle = model.get_submodule(noise.target_name).register_forward_hook(noise._hook)


@torch.no_grad()
def shrink(model: nn.Module, example_inputs=None, fold: bool = True, verify: bool = True) -> nn.Module:
    """A plain ``nn.Module`` without noise layers and without the masked structures.

    Its eval output equals the masked model's eval output (``fold=True``; checked on a random
    probe when ``verify``).  ``fold=False`` only removes structures (used to count
    parameters; then only output shapes are checked).  The input model is left untouched.
    """
    return _shrink(model, example_inputs, fold=fold, keep_noise=False, verify=verify)


@torch.no_grad()
def shrink_for_training(model: nn.Module, example_inputs=None, verify: bool = True) -> nn.Module:
    """A smaller copy that keeps its noise layers, for training on after pruning.

    Masked structures are removed as in :func:`shrink` with their noise entries (``mu``,
    ``log_sigma``, ``mask``); nothing is folded, so the kept structures keep their posterior
    and mask.  The new model has new parameters: rebuild the optimizer (and any scheduler or
    EMA state that refers to parameters) after calling this.
    """
    return _shrink(model, example_inputs, fold=False, keep_noise=True, verify=verify)


def remaining_parameters(model: nn.Module, example_inputs=None) -> int:
    """Parameters left after physically removing the masked structures (noise excluded)."""
    return count_parameters(shrink(model, example_inputs, fold=False))
