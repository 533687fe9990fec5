"""Which layers are prunable, and which of them get noise: the one place that decides it for
:func:`bayesprune.add_noise` and for the Bayes-factor masks (:func:`bayesprune.bayes_factor.prunable_weights`).

* **Prunable layers**: ``nn.Linear``, ``nn.Conv1d/2d/3d`` (:data:`PRUNABLE_TYPES`) and layers
  that compute a Linear with the weight stored transposed, ``[in, out]`` (Hugging Face's
  ``transformers.pytorch_utils.Conv1D`` of GPT-2, recognised by :func:`is_transposed_linear`
  without importing transformers).  One structure per output feature / channel.
* **Recurrent layers** (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) are not prunable structures here:
  their gates tie each hidden unit to four (LSTM) or three (GRU) rows, which Torch-Pruning does
  not map; a Linear feeding one is kept out of the noise (its removal would change the recurrent
  layer's input size), and the reason is said
  (:func:`select_noise_layers` raises when nothing is left).
* **Prediction heads** get no noise by default: a prunable layer is a head when a model output
  depends on its output without passing through another prunable layer (docs/core.md, "Which
  layers").  That is the classifier of a classification network, and every box / class / objectness
  layer of a detector.  Found by one traced forward pass that follows every tensor operation
  (a ``TorchFunctionMode``): each tensor carries the set of prunable layers whose output it was
  computed from since the last one; the sets that reach the model's outputs are the heads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "PRUNABLE_TYPES",
    "RECURRENT_TYPES",
    "is_transposed_linear",
    "is_prunable",
    "num_structures",
    "resolve_layers",
    "trace",
    "Trace",
    "select_noise_layers",
    "prunable_weight_layers",
]

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
RECURRENT_TYPES = (nn.RNNBase,)
#: BatchNorm classes whose calls are traced even when they have children (timm's BatchNormAct2d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def is_transposed_linear(module: nn.Module) -> bool:
    """A Linear whose weight is stored ``[in, out]`` with ``nf`` outputs and ``nx`` inputs
    (Hugging Face's ``Conv1D``: ``y = x @ W + b``)."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, nn.Parameter) and w.ndim == 2
            and isinstance(getattr(module, "nf", None), int) and isinstance(getattr(module, "nx", None), int)
            and tuple(w.shape) == (module.nx, module.nf))


def is_prunable(module: nn.Module) -> bool:
    """Linear, Conv1d/2d/3d or a transposed Linear (:func:`is_transposed_linear`)."""
    return isinstance(module, PRUNABLE_TYPES) or is_transposed_linear(module)


def prunable_kinds() -> str:
    return ", ".join(t.__name__ for t in PRUNABLE_TYPES) + " and Hugging Face Conv1D"


def num_structures(layer: nn.Module) -> tuple[int, int]:
    """(number of output structures, the dimension they lie along in the layer's output)."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, -1
    if is_transposed_linear(layer):
        return layer.nf, -1
    return layer.out_channels, 1


def resolve_layers(model: nn.Module, layers: Iterable, kinds=None) -> list[str]:
    """Qualified names of ``layers`` (names or modules of ``model``), each checked to be
    prunable (``kinds``: a tuple of classes instead of :func:`is_prunable`)."""
    named = dict(model.named_modules())
    by_id = {}
    for n, m in named.items():
        by_id.setdefault(id(m), n)
    names = []
    for item in layers:
        if isinstance(item, str):
            if item not in named:
                raise ValueError(f"no module named {item!r} in the model")
            names.append(item)
        elif isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(f"module {type(item).__name__} is not part of the model")
            names.append(by_id[id(item)])
        else:
            raise TypeError(f"layers must hold names or nn.Module objects, got {type(item).__name__}")
    for n in names:
        m = named[n]
        ok = isinstance(m, kinds) if kinds is not None else is_prunable(m)
        if not ok:
            valid = ", ".join(t.__name__ for t in kinds) if kinds is not None else prunable_kinds()
            raise ValueError(f"layer {n!r} is a {type(m).__name__}; prunable layers are {valid}")
    return list(dict.fromkeys(names))


def prunable_weight_layers(model: nn.Module, modules: Iterable | None = None, kinds=PRUNABLE_TYPES) -> list[str]:
    """Names of the layers whose weights are prunable (all of ``kinds`` in the model, or the
    ``modules`` given, checked), in ``named_modules`` order."""
    if modules is None:
        return [n for n, m in model.named_modules() if isinstance(m, kinds)]
    return resolve_layers(model, modules, kinds=kinds)


# ---------------------------------------------------------------------------------------------
# the traced forward pass


@dataclass
class _Call:
    name: str
    module: nn.Module
    inputs: tuple
    output: object


@dataclass
class Trace:
    """One eval-mode forward pass: leaf-module calls in order, the prunable layers that are
    prediction heads, and per prunable layer the recurrent modules its output feeds (names)."""

    calls: list = field(default_factory=list)
    #: id(tensor) -> how many operations outside the traced modules take it (``scale * x``)
    functional_uses: dict = field(default_factory=dict)
    heads: list = field(default_factory=list)
    recurrent: dict = field(default_factory=dict)
    outputs_followed: bool = False


def _flat_tensors(obj, out: list) -> list:
    if torch.is_tensor(obj):
        out.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _flat_tensors(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _flat_tensors(v, out)
    return out


class _Lineage(TorchFunctionMode):
    """Tags every tensor an operation returns with the union of its tensor arguments' tags; a
    prunable layer's hook sets its output's tag to the layer alone."""

    def __init__(self):
        super().__init__()
        self.tags: dict[int, frozenset] = {}
        self.alive: list = []  # keeps tagged tensors alive so their ids stay unique
        self.depth = 0  # > 0 inside a traced module's forward
        self.uses: dict[int, int] = {}

    def tag_of(self, t) -> frozenset:
        return self.tags.get(id(t), frozenset())

    def set_tag(self, t, tag: frozenset) -> None:
        self.tags[id(t)] = tag
        self.alive.append(t)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = _flat_tensors(args, [])
        _flat_tensors(kwargs, ins)
        outs = _flat_tensors(out, [])
        if self.depth == 0 and outs:  # an operation between modules (not .shape, .dim(), ...)
            for t in ins:
                self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                self.alive.append(t)
        if ins:
            tag = frozenset().union(*(self.tag_of(t) for t in ins))
            if tag:
                for t in outs:
                    self.set_tag(t, tag | self.tag_of(t) if any(t is i for i in ins) else tag)
        return out


def _call_model(model, example_inputs):
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    return model(example_inputs)


def trace(model: nn.Module, example_inputs) -> Trace:
    """Record one eval-mode, no-grad forward pass on ``example_inputs`` (see :class:`Trace`)."""
    result = Trace()
    names = {}
    for n, m in model.named_modules():
        names.setdefault(m, n)
    lineage = _Lineage()
    handles = []

    def pre_hook(module, args):
        lineage.depth += 1

    def hook(module, args, output):
        lineage.depth -= 1
        name = names[module]
        result.calls.append(_Call(name, module, tuple(a for a in args if torch.is_tensor(a)), output))
        if is_prunable(module):
            for t in _flat_tensors(output, []):
                lineage.set_tag(t, frozenset([name]))
        elif isinstance(module, RECURRENT_TYPES):
            for t in _flat_tensors(args, []):  # the layers feeding it
                for layer in lineage.tag_of(t):
                    result.recurrent.setdefault(layer, []).append(name)
            for t in _flat_tensors(output, []):  # what it computes is its own, not theirs
                lineage.set_tag(t, frozenset())

    for m in model.modules():
        if len(list(m.children())) == 0 or is_prunable(m) or isinstance(m, _BN_TYPES + RECURRENT_TYPES):
            handles.append(m.register_forward_pre_hook(pre_hook))
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), lineage:
            out = _call_model(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    heads = set()
    outs = _flat_tensors(out, [])
    for t in outs:
        heads |= lineage.tag_of(t)
    result.outputs_followed = bool(outs)
    kept = {id(c.output) for c in result.calls}  # ids of tensors still alive (held by the calls)
    result.functional_uses = {k: v for k, v in lineage.uses.items() if k in kept}
    order = list(dict.fromkeys(c.name for c in result.calls if is_prunable(c.module)))
    if not outs and order:  # no tensor in the output to follow: the last layer run is the head
        heads = {order[-1]}
    result.heads = [n for n in order if n in heads]
    result.recurrent = {k: list(dict.fromkeys(v)) for k, v in result.recurrent.items()}
    return result


def select_noise_layers(model: nn.Module, traced: Trace, layers=None, exclude_output_layer: bool = True) -> list[str]:
    """The layers :func:`bayesprune.add_noise` puts noise on, in the order the forward pass
    first runs them (chosen layers it does not run come last).

    By default every prunable layer that runs except the prediction heads (``traced.heads``;
    ``exclude_output_layer=False`` includes them) and the layers feeding a recurrent module;
    ``layers`` chooses them instead (names or modules, each checked to be prunable; a chosen
    layer feeding a recurrent module is refused, naming both).  Raises ``ValueError`` naming
    why when nothing is selected.
    """
    candidates = list(dict.fromkeys(c.name for c in traced.calls if is_prunable(c.module)))
    if layers is not None:
        wanted = resolve_layers(model, layers)
        for name in wanted:
            if name in traced.recurrent:
                raise ValueError(_recurrent_reason(name, traced.recurrent[name]))
        chosen = [n for n in candidates if n in wanted] + [n for n in wanted if n not in candidates]
        if not chosen:
            raise ValueError("layers= selects no layer")
        return chosen
    heads = set(traced.heads) if exclude_output_layer else set()
    chosen = [n for n in candidates if n not in heads and n not in traced.recurrent]
    if chosen:
        return chosen
    why = []
    recurrent = sorted(n for n, m in model.named_modules() if isinstance(m, RECURRENT_TYPES))
    if recurrent:
        why.append("recurrent layers (" + ", ".join(f"{n!r}: {type(model.get_submodule(n)).__name__}" for n in recurrent)
                   + ") are not prunable structures: their gates tie each hidden unit to several weight rows, "
                   "which Torch-Pruning does not map")
    for n in candidates:
        if n in traced.recurrent:
            why.append(_recurrent_reason(n, traced.recurrent[n]))
        elif n in heads:
            why.append(f"{n!r} is a prediction head (a model output is computed from it without another "
                       "prunable layer in between; exclude_output_layer=False gives it noise)")
    if not candidates:
        why.append(f"no {prunable_kinds()} layer runs in the forward pass on the example input")
    raise ValueError("no layer to add noise to: " + "; ".join(why))


def _recurrent_reason(layer: str, recurrent: list) -> str:
    return (f"layer {layer!r} feeds the recurrent layer(s) {', '.join(map(repr, recurrent))}: removing its "
            "structures would change the recurrent layer's input or hidden size, which Torch-Pruning does not map")
