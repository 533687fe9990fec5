"""Counting what ``shrink`` would leave, without shrinking: ``remaining_parameters`` (the count
``prune`` reports) and the fast estimate that ``prune(compression=)`` searches on, from the
dependency groups of every noise layer (Torch-Pruning's graph, built once per model structure
and cached; docs/shrink.md, "The fast estimate")."""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn

from . import heads as _heads
from .noise import _BN_TYPES, noise_layers, remove_noise
from .removal import (
    _CROSS_CHANNEL_NORMS,
    _build_graph,
    _cached_shrink,
    _dim_size,
    _eval_outputs,
    _example,
    _grad_name,
    _items,
    _mismatch,
    _op_types,
    _out_pruner,
    _probe,
    _shapes,
    _shrink,
    _signature,
    _tied_to_untraced,
    _tp,
    count_parameters,
)
from .selection import is_prunable, is_transposed_linear

__all__ = ["remaining_parameters"]


def remaining_parameters(model: nn.Module, example_inputs=None) -> int:
    """Parameters of the network ``shrink(model, example_inputs)`` returns (noise excluded).

    It is that network's count: the model is shrunk (folded, verified) and the result cached
    with the model's state, so a later ``shrink`` with the same masks and weights is a copy.
    Raises what ``shrink`` raises.
    """
    return count_parameters(_cached_shrink(model, example_inputs))


def _estimated_remaining(model: nn.Module, example_inputs=None) -> int:
    """A fast estimate of :func:`remaining_parameters` for searches (``prune(compression=)``).

    Counted from the dependency groups (computed once per model structure and cached) without
    copying or pruning the model, unless a masked layer's removal is one Torch-Pruning may get
    wrong (its group passes through a reshape, permute or matmul and removing one of its
    structures broke the forward pass; e.g. attention heads), touches a module type counted
    here, or a layer is masked whole (what only it reads goes too): then the model is shrunk
    without folding.  Never above the true count: shrink may keep
    more (a removal that is not exact), never less.
    """
    example_inputs = _example(model, example_inputs)
    layers = noise_layers(model)
    if not layers:
        raise ValueError("model has no noise layers: nothing to shrink (call bayesprune.add_noise first)")
    for n in layers:
        n.check_finite()
    if _heads.head_noise_layers(model):  # heads are counted by removing them (heads.py)
        return count_parameters(_shrink(model, example_inputs, fold=False, keep_noise=False, verify=True))
    an = _analysis(model, example_inputs)
    masks = {n.layer_name: n.mask.detach().cpu() == 0 for n in layers}
    dead = any(bool(masks[name].all()) for name in an.layers)  # its inputs go too: counted by shrinking
    if an.countable and not dead and not any(bool(masks[name].any()) for name in an.unsafe):
        return count_parameters(model) - an.removed_parameters(masks)
    with torch.no_grad():
        small = _shrink(model, example_inputs, fold=False, keep_noise=False, verify=True,
                        assume_safe=frozenset(an.layers) - an.unsafe)
    return count_parameters(small)


# ---------------------------------------------------------------------------------------------
# counting without pruning: the dependency groups of every layer, once per model structure


class _Analysis:
    """Per noise layer and root structure r: the (module, out/in, index) entries Torch-Pruning
    removes with r, the coupled output structures of other layers, and the static vetoes."""

    def __init__(self, model, example_inputs):
        m = copy.deepcopy(model)
        # attention heads are counted by removing them (heads.py), not from the dependency groups
        names = [n.layer_name for n in noise_layers(m) if not isinstance(n, _heads.HeadNoise)]
        remove_noise(m)
        graph = _build_graph(m, example_inputs)
        mod_name = {id(mod): name for name, mod in m.named_modules()}
        self.layers = names
        self.items: dict[str, list[list[tuple[str, bool, int]]]] = {}
        self.coupled: dict[str, list[list[tuple[str | None, int]]]] = {}
        self.veto: dict[str, set[int]] = {}
        self.unsafe: set[str] = set()
        self.modules: dict[str, nn.Module] = {}  # shapes only (the copy is pruned by no one)
        self.countable = True
        suspicious = []
        for name in names:
            layer = m.get_submodule(name)
            n = _dim_size(layer, True)
            items = [[] for _ in range(n)]
            coupled = [[] for _ in range(n)]
            veto, odd = set(), False
            group = graph.get_pruning_group(layer, _out_pruner(layer), idxs=list(range(n)))
            for dep, pairs in _items(group):
                mod, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
                if any(r is None for _, r in pairs):
                    veto.update(range(n))
                    odd = True
                    continue
                if isinstance(mod, _CROSS_CHANNEL_NORMS) or _tied_to_untraced(dep.target):
                    veto.update(r for _, r in pairs)
                    continue
                if dep.target.type in _op_types():
                    odd = odd or self._odd_op(dep.target)
                    continue
                if not isinstance(mod, nn.Module) or id(mod) not in mod_name:
                    self.countable = False  # an unwrapped nn.Parameter or similar
                    continue
                mname = mod_name[id(mod)]
                size = _dim_size(mod, out)
                grouped = isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups != 1
                if size is None or grouped:
                    if any(True for _ in mod.parameters(recurse=False)):
                        self.countable = False
                    continue
                self.modules[mname] = mod
                bad = {r for i, r in pairs if not 0 <= i < size}
                if bad:
                    veto.update(bad)
                    odd = True
                for i, r in pairs:
                    if r not in bad:
                        items[r].append((mname, out, i))
                if mod is not layer and is_prunable(mod) and out:
                    for i, r in pairs:
                        coupled[r].append((mname if mname in names else None, i))
            self.items[name], self.coupled[name], self.veto[name] = items, coupled, veto
            if odd:
                suspicious.append(name)
        if suspicious:  # does removing one structure of the layer (and what it drags along) break it?
            probe = _probe(example_inputs)
            reference = _eval_outputs(m, probe)
            for name in suspicious:
                free = [r for r in range(len(self.items[name])) if r not in self.veto[name]]
                if free and self._breaks(m, example_inputs, probe, reference, name, free[0]):
                    self.unsafe.add(name)

    @staticmethod
    def _odd_op(node) -> bool:
        """An operation whose index mapping Torch-Pruning may get wrong."""
        name = _grad_name(node).lower()
        if node.type == _tp.OPTYPE.RESHAPE:
            if any(isinstance(dep.index_mapping[0], _tp.FlattenIndexMapping) for dep in node.dependencies):
                return False
            shapes = _shapes(node.grad_fn)
            return shapes is None or shapes[0][-1] != shapes[1][-1]
        if node.type == _tp.OPTYPE.ELEMENTWISE:
            return any(k in name for k in ("permute", "transpose", "bmm", "matmul", "unknown")) or name == ""
        return node.type not in (_tp.OPTYPE.CONCAT, _tp.OPTYPE.SPLIT, _tp.OPTYPE.EXPAND)

    @staticmethod
    def _breaks(base, example_inputs, probe, reference, name, root) -> bool:
        trial = copy.deepcopy(base)
        try:
            graph = _build_graph(trial, example_inputs)
            layer = trial.get_submodule(name)
            graph.get_pruning_group(layer, _out_pruner(layer), idxs=[root]).prune(record_history=False)
        except Exception:
            return True
        return _mismatch(reference, trial, probe, values=False) is not None

    def removed_parameters(self, masks: dict[str, torch.Tensor]) -> int:
        """Parameters that ``_remove_structures`` would remove for these masks (True = masked)."""
        gone: dict[tuple[str, bool], set[int]] = {}
        for name in self.layers:
            mask = masks[name]
            own = gone.get((name, True), set())
            cand = [i for i in torch.nonzero(mask).flatten().tolist() if i not in own]
            if not cand:
                continue
            veto = self.veto[name]
            removing = [
                i for i in cand
                if i not in veto and all(o is not None and bool(masks[o][j]) for o, j in self.coupled[name][i])
            ]
            if len(removing) >= len(mask) - len(own):
                removing = removing[1:]  # Torch-Pruning cannot empty a layer; one zeroed unit stays
            for r in removing:
                for mname, out, i in self.items[name][r]:
                    gone.setdefault((mname, out), set()).add(i)
        total = 0
        for mname in {k for k, _ in gone}:
            mod = self.modules[mname]
            ro, ri = gone.get((mname, True), set()), gone.get((mname, False), set())
            full = sum(p.numel() for p in mod.parameters(recurse=False))
            if isinstance(mod, _BN_TYPES):
                kept = (mod.num_features - len(ro | ri)) * (2 if mod.affine else 0)
            else:
                i, o = mod.weight.shape[:2] if is_transposed_linear(mod) else mod.weight.shape[1::-1]
                k = mod.weight[0, 0].numel()
                kept = (o - len(ro)) * (i - len(ri)) * k + (o - len(ro) if mod.bias is not None else 0)
            total += full - kept
        return total


_ANALYSES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _analysis(model, example_inputs) -> _Analysis:
    """The cached :class:`_Analysis` of ``model`` (rebuilt when its structure changes)."""
    sig = _signature(model, example_inputs)
    hit = _ANALYSES.get(model)
    if hit is not None and hit[0] == sig:
        return hit[1]
    an = _Analysis(model, example_inputs)
    _ANALYSES[model] = (sig, an)
    return an
