"""Physical removal of pruned structures: a smaller dense network.

``shrink(model)`` copies the model, folds ``E[theta] * mask`` of every noise
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
Through a grouped convolution (not depthwise) the removal is rounded to what leaves one: the
groups whose inputs and rows are all removable go (``groups`` drops), and of the other groups
the same number of inputs and of rows from each (:func:`_equal_groups`); the masked channels
that stay are zeroed, as above.

Every function here uses the example input given to ``add_noise`` (kept by the noise layers)
unless it is passed another one.

Verification: the result is compared with the masked model's eval output on several inputs
(the example and two random ones shaped like it), and again on a copy whose BatchNorm running
statistics are randomised (a zeroed channel that still feeds a BatchNorm gives a constant, not
a zero, so its removal is inexact once the statistics move), each to ``VERIFY_RTOL`` of the
output scale (docs/shrink.md, "Exactness").  If any differs, the layers known inexact
(``_predicted_inexact``: q/k/v features split into heads by a reshape, a zero channel reaching a
foreign BatchNorm) are left out, then the rest are searched by halving, and the layers whose
removal breaks the output keep their structures (zeroed, not removed):
``shrunk.bayesprune_kept`` names them with the reason.  An inexact fold raises, unless the same
fold in float64 is exact (then the check is at the float network's own rounding).  Where the
outputs differ but the prediction heads' outputs (heads without noise) agree, the difference is
post-processing (a detector's NMS on near ties) and the removal is accepted (docs/shrink.md).

``counting.remaining_parameters`` (the count ``prune`` reports and ``compression=`` searches on)
is the parameter count of the network ``shrink`` returns; the shrunk network is cached with the
model's state, so ``shrink`` after ``prune`` costs a copy.

The shrunk model carries ``model.bayesprune_pruning = {"inputs": ..., "steps": ...}``:
the Torch-Pruning history (``[layer name, True, [output indices]]`` per step) that rebuilds it
from the original architecture (used by :mod:`bayesprune.export`).
"""

from __future__ import annotations

import copy
import math
import warnings
import weakref

import torch
from torch import nn

from ._lazy import lazy_import
from . import heads as _heads
from .selection import is_prunable, is_transposed_linear

_tp = lazy_import("bayesprune._torch_pruning")  # Torch-Pruning is imported when first used

from .noise import (
    _BN_TYPES,
    _HOMOGENEOUS_ACTIVATIONS,
    _POOL_TYPES,
    MultiplicativeNoise,
    _install_joint_draw,
    meta_error,
    noise_layers,
    remove_noise,
    stored_example_inputs,
)

__all__ = ["shrink", "shrink_for_training", "ShrinkVerificationWarning", "parameter_origins", "carry_optimizer_state", "count_parameters", "replay_pruning"]

#: f(s x) = s f(x) for a per-channel s >= 0: a scale after them folds into the module before them
_HOMOGENEOUS = _HOMOGENEOUS_ACTIVATIONS + _POOL_TYPES
_CROSS_CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)
VERIFY_RTOL = 1e-5  # of the output scale; the fold itself is exact up to float rounding


class ShrinkVerificationWarning(UserWarning):
    """shrink could not check the shrunk network's values (the model's outputs were empty or zero)."""


def count_parameters(model: nn.Module) -> int:
    """Parameters of the network, not counting noise parameters."""
    return sum(p.numel() for n, p in model.named_parameters() if "bayes_noise" not in n)


def _example(model, example_inputs):
    """The example inputs (given, or kept by the noise layers since add_noise), on the model's
    device and, for floating-point inputs, in its floating dtype: a model moved to CUDA or cast to
    float64 after add_noise still finds its stored example usable."""
    if example_inputs is None:
        example_inputs = stored_example_inputs(model)
    if example_inputs is None:
        raise ValueError(
            "no example input: this model has no noise layers that keep one (add_noise(model, "
            "example_inputs) stores it); pass example_inputs, a small input batch"
        )
    p = next((q for q in model.parameters() if q.is_floating_point()), None)
    if p is None:
        return example_inputs
    if p.is_meta:
        raise meta_error("removal (a traced forward pass, compared outputs)")

    def move(x):
        if not torch.is_tensor(x):
            return x
        return x.to(device=p.device, dtype=p.dtype if x.is_floating_point() else None)

    return _map_inputs(move, example_inputs)


def _map_inputs(fn, inputs):
    """``fn`` applied to a single input, or to each entry of (nested) tuples, lists and dicts of
    inputs (a detector's one argument is a list of images)."""
    if isinstance(inputs, dict):
        return {k: _map_inputs(fn, v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(_map_inputs(fn, v) for v in inputs)
    return fn(inputs)


def _first_example(inputs):
    """One example of the batch ``inputs``: top-level tensors that share a batch size > 1 sliced to
    their first row, or each list of tensors among the arguments (a detector's images) cut to its
    first; else ``inputs`` as given."""
    entries = list(inputs.values()) if isinstance(inputs, dict) else list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
    if entries and all(torch.is_tensor(t) and t.ndim >= 1 for t in entries):
        if len({t.shape[0] for t in entries}) == 1 and entries[0].shape[0] > 1:
            cut = [t[:1] for t in entries]
            return cut[0] if torch.is_tensor(inputs) else dict(zip(inputs, cut)) if isinstance(inputs, dict) else type(inputs)(cut)
        return inputs

    def first(v):
        return v[:1] if isinstance(v, list) and len(v) > 1 and all(torch.is_tensor(t) for t in v) else v

    if isinstance(inputs, dict):
        return {k: first(v) for k, v in inputs.items()}
    return type(inputs)(first(v) for v in inputs) if isinstance(inputs, (tuple, list)) else inputs


def _run(model, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _output_tensors(model, inputs) -> list[torch.Tensor]:
    """The tensors of ``model``'s output on ``inputs`` (other objects in it, e.g. a cache, dropped),
    then the output of every Linear/Conv layer that ran: Torch-Pruning builds its graph backwards
    from these, and a layer whose output reaches the model's output only through non-differentiable
    steps (a detector's region proposals: top-k indices, detached boxes) would otherwise be missing
    from it, with the couplings of what it reads (torchvision Faster R-CNN's RPN head, shared by
    the FPN levels: removing an FPN channel left its input at the old width)."""
    ran: list[torch.Tensor] = []

    def record(module, args, output):
        if torch.is_tensor(output) and output.grad_fn is not None:
            ran.append(output)

    hooks = [m.register_forward_hook(record) for m in model.modules() if is_prunable(m)]
    try:
        out = _tensors(_run(model, inputs))
    finally:
        for h in hooks:
            h.remove()
    return out + ran


def _tensors(out) -> list[torch.Tensor]:
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _probe(example_inputs, seed: int = 0, scale: float = 1.0, shift: float = 0.0):
    """Random inputs shaped like ``example_inputs`` (integer tensors, e.g. token ids, kept)."""
    g = torch.Generator().manual_seed(seed)

    def rand(x):
        if torch.is_tensor(x) and x.is_floating_point():
            r = torch.randn(x.shape, generator=g, dtype=torch.float32) * scale + shift
            return r.to(dtype=x.dtype, device=x.device)
        return x

    return _map_inputs(rand, example_inputs)


def _probes(example_inputs) -> list:
    """The inputs a removal is verified on: the example, a standard normal one and a wider,
    shifted one (only the example when every input is an integer tensor).  The random ones hold
    one example (:func:`_first_example`: the first row of a batch, a detector's first image):
    half the cost of a batch of two, and exactness does not depend on the batch."""
    tensors = _tensors(example_inputs)
    if not any(t.is_floating_point() for t in tensors):
        return [example_inputs]
    base = _first_example(example_inputs)
    return [example_inputs, _probe(base, 0), _probe(base, 1, 2.0, 0.5)]


def _freeze_noise(model, frozen: bool = True) -> None:
    """Make every noise module of ``model`` multiply by its eval factor E[theta] * mask computed
    once, instead of recomputing the posterior mean at every call: the same eval output
    (``MultiplicativeNoise.forward``'s formula), for the reference passes; ``frozen=False``
    restores the modules' own forward."""
    if not frozen:
        for noise in noise_layers(model):
            noise.__dict__.pop("forward", None)
        return
    for noise in noise_layers(model):
        factor = (noise.expected_theta() * noise.mask).detach()

        def forward(h, noise=noise, factor=factor):
            shape = [1] * h.ndim
            shape[noise.dim % h.ndim] = noise.num_structures
            return h * factor.to(h.dtype).view(shape)

        noise.forward = forward


def _randomised_bn(model) -> nn.Module | None:
    """A copy of ``model`` whose BatchNorm running statistics are random (mean N(0, 0.5^2),
    variance U(0.5, 2); the same values for models with the same BatchNorm layers, in order);
    None when it has no BatchNorm with running statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]
    if not bns:
        return None
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    for m in twin.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            n = m.running_mean.numel()
            m.running_mean.copy_(0.5 * torch.randn(n, generator=g, dtype=torch.float64))
            m.running_var.copy_(0.5 + 1.5 * torch.rand(n, generator=g, dtype=torch.float64))
    return twin


class _ProbeList(list):
    """Several verification inputs (a list, not one input given as a list of arguments)."""


@torch.no_grad()
def _eval_outputs(model, inputs):
    if isinstance(inputs, _ProbeList):
        return [_eval_outputs(model, x) for x in inputs]
    was = model.training
    model.eval()
    try:
        return [t.detach().clone() for t in _tensors(_run(model, inputs))]
    finally:
        model.train(was)


def _mismatch(reference, model, inputs, values: bool = True, rtol: float = VERIFY_RTOL, outputs=None) -> str | None:
    """None if ``model`` reproduces ``reference`` on ``inputs`` to ``rtol`` of the output scale
    (only its shapes unless ``values``); ``outputs``: the outputs already computed (then
    ``model`` is not run).

    ``inputs`` may be a list of inputs (:func:`_probes`) with ``reference`` the list of their outputs."""
    if isinstance(inputs, _ProbeList):
        for k, (ref, inp) in enumerate(zip(reference, inputs)):
            why = _mismatch(ref, model, inp, values=values, rtol=rtol, outputs=None if outputs is None else outputs[k])
            if why is not None:
                return f"{why} on verification input {k}" if values else why
            if not values:
                return None  # shapes: one input is enough
        return None
    try:
        outs = _eval_outputs(model, inputs) if outputs is None else outputs
    except Exception as e:  # a removal that broke a reshape, a concat, ...
        return f"forward pass failed: {type(e).__name__}: {e}"
    if len(outs) != len(reference) or any(a.shape != b.shape for a, b in zip(outs, reference)):
        return "output shapes differ"
    if not values:
        return None
    for a, b in zip(outs, reference):
        if b.is_floating_point() and not bool(torch.isfinite(b).all()):  # NaN/inf where the reference has them
            finite = torch.isfinite(b)
            if not torch.equal(finite, torch.isfinite(a)) or not torch.equal(a[~finite].isnan(), b[~finite].isnan()):
                return "non-finite outputs differ"
            a, b = a[finite], b[finite]
        scale = b.abs().max().item() if b.numel() else 0.0
        diff = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        # half/bfloat16 networks round at ~1e-3/1e-2: the fold then moves outputs by a few ulps
        tol = max(rtol, 4 * torch.finfo(b.dtype).eps) if b.is_floating_point() else rtol
        if not diff <= tol * max(scale, 1e-12):
            return f"max abs difference {diff:.3g} at output scale {scale:.3g}"
    return None


def _relative_difference(reference, outputs) -> float:
    """max|out - ref| / max|ref| over per-input lists of output tensors (``_eval_outputs`` of a
    _ProbeList), at the finite entries of both."""
    worst = 0.0
    for refs, outs in zip(reference, outputs):
        for b, a in zip(refs, outs):
            if not b.is_floating_point() or not b.numel():
                continue
            finite = torch.isfinite(b) & torch.isfinite(a)
            a, b = a[finite].double(), b[finite].double()
            if b.numel():
                worst = max(worst, (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12))
    return worst


def _head_outputs(model, inputs, heads: list[str]) -> list:
    """Per input of ``inputs`` (a _ProbeList), the eval outputs of the modules named ``heads``
    (their first call), in that order."""
    mods = [model.get_submodule(h) for h in heads]
    out = []
    for inp in inputs:
        seen: dict = {}

        def keep(k, o):
            if k not in seen:  # cloned now: a later in-place operation may change the tensor
                seen[k] = [t.detach().clone() for t in _tensors(o)]

        handles = [m.register_forward_hook(lambda mod, a, o, k=k: keep(k, o)) for k, m in enumerate(mods)]
        try:
            _eval_outputs(model, inp)
        finally:
            for h in handles:
                h.remove()
        out.append([t for k in range(len(mods)) for t in seen.get(k, [])])
    return out


def _prediction_heads(model, example_inputs) -> list[str]:
    """The prediction heads of ``model`` (selection.trace: the layers a model output is computed
    from without another prunable layer) when none of them has noise: their outputs keep their
    shape through any removal.  Empty when a head has noise or the trace fails."""
    from .selection import trace

    try:
        heads = list(dict.fromkeys(trace(model, example_inputs).heads))
    except Exception:
        return []
    noisy = {n.layer_name for n in noise_layers(model)}
    return [] if not heads or noisy & set(heads) else heads


#: the most a network's own float rounding may widen the check (``_rounding_tolerance``)
ROUNDING_RTOL_MAX = 1e-3


def _rounding_tolerance(model, example_inputs, reference, folded, probes) -> float | None:
    """For a float32 (or narrower) network whose fold alone misses ``VERIFY_RTOL``: the same fold
    computed in float64 on a float64 copy; when that one is exact (1e-9 of the output scale), the
    miss is the network's float rounding (large activations cancelling: a trained LeNet5 on the
    wide probe input missed by 1.1e-5), and the tolerance becomes twice the float fold's
    difference (at most ``ROUNDING_RTOL_MAX``).  None otherwise (the fold is really inexact)."""
    if not any(p.is_floating_point() and p.dtype != torch.float64 for p in model.parameters()):
        return None
    try:
        def to64(t):
            return t.double() if torch.is_tensor(t) and t.is_floating_point() else t

        wide = copy.deepcopy(model).double()
        ex = _map_inputs(to64, example_inputs)
        wide_probes = _ProbeList(_map_inputs(to64, p) for p in probes)
        _freeze_noise(wide)
        wide_reference = _eval_outputs(wide, wide_probes)
        entries = [_entry(n) for n in noise_layers(wide)]
        _freeze_noise(wide, frozen=False)
        remove_noise(wide)
        _fold_all(wide, entries, ex)
        if _relative_difference(wide_reference, _eval_outputs(wide, wide_probes)) > 1e-9:
            return None
        observed = _relative_difference(reference, _eval_outputs(folded, probes))
    except Exception:  # no float64 on this device, a dtype-bound forward: keep the strict check
        return None
    return 2 * observed if observed <= ROUNDING_RTOL_MAX / 2 else None


def _out_pruner(module):
    if is_transposed_linear(module):
        return _tp.TRANSPOSED_LINEAR_PRUNER.prune_out_channels
    if isinstance(module, nn.Linear):
        return _tp.prune_linear_out_channels
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _tp.CONV_PRUNER.prune_out_channels
    raise TypeError(f"cannot remove output structures of {type(module).__name__}")


def _grouped(module) -> bool:
    """A convolution with groups > 1 (depthwise included)."""
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1


def _in_pruner(module):
    if is_transposed_linear(module):
        return _tp.TRANSPOSED_LINEAR_PRUNER.prune_in_channels
    if isinstance(module, nn.Linear):
        return _tp.prune_linear_in_channels
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _tp.CONV_PRUNER.prune_in_channels
    raise TypeError(f"cannot remove input structures of {type(module).__name__}")


def _items(group):
    """(dependency, [(index in this module, index in the root layer), ...]) per group item.

    The root index is None where Torch-Pruning lost track of it (e.g. its GQA mapping)."""
    for item in group.items:
        roots = getattr(item, "root_idxs", None)
        if roots is None or len(roots) != len(item.idxs):
            roots = [None] * len(item.idxs)
        yield item.dep, [(int(i), None if r is None else int(r)) for i, r in zip(item.idxs, roots)]


def _dim_size(module, out: bool) -> int | None:
    """Size of the dimension a Torch-Pruning out/in handler indexes in ``module`` (None: unknown)."""
    if isinstance(module, nn.Linear):
        return module.out_features if out else module.in_features
    if is_transposed_linear(module):
        return module.nf if out else module.nx
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return module.out_channels if out else module.in_channels
    if isinstance(module, _BN_TYPES):
        return module.num_features
    return None


def _shapes(grad_fn):
    """(input shape, output shape) of a view/reshape autograd node, or None."""
    src = getattr(grad_fn, "_saved_self_sym_sizes", None)
    meta = getattr(grad_fn, "_input_metadata", None)
    if src is None or not meta:
        return None
    try:
        return tuple(int(v) for v in src), tuple(int(v) for v in meta[0].shape)
    except Exception:  # symbolic sizes
        return None


def _op_types() -> set:
    """Torch-Pruning's operation types a channel passes through unchanged in count."""
    t = _tp.OPTYPE
    return {t.ELEMENTWISE, t.RESHAPE, t.CONCAT, t.SPLIT, t.EXPAND, t.SLICE, t.UNBIND}


def _grad_name(node) -> str:
    g = node.grad_fn
    return g.name() if g is not None and hasattr(g, "name") else ""


def _tied_to_untraced(node) -> bool:
    """An element-wise add/sub/mul/div one of whose tensor operands Torch-Pruning cannot prune
    (a model input or a buffer, e.g. ``tokens + attn(tokens)``): its channels cannot be removed."""
    if node.type != _tp.OPTYPE.ELEMENTWISE:
        return False
    name = _grad_name(node)
    if not name.startswith(("AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0")):
        return False
    if node.grad_fn in getattr(node, "_bayesprune_scalar_ops", ()):
        return False  # its untraced operand is a number (seen in the traced forward pass)
    nexts = getattr(node.grad_fn, "next_functions", ())
    for k, (f, _) in enumerate(nexts):
        if f is not None:
            continue
        if name.startswith(("MulBackward0", "DivBackward0")):  # a scalar factor (e.g. 1/sqrt(d)) is harmless
            try:
                other = getattr(node.grad_fn, "_saved_other" if k == 1 else "_saved_self")
            except Exception:
                other = None
            if torch.is_tensor(other) and other.numel() == 1:
                continue
        return True  # an add/sub with an untraced tensor (or a scalar: indistinguishable, so kept)
    return False


def _through_permute(node, limit: int = 64) -> bool:
    """Whether a permute/transpose/reshape lies between ``node`` and the layers that produced it."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if id(n) in seen or n.type not in _op_types():
            continue  # a layer (conv, BN, ...) sets the channel dimension
        seen.add(id(n))
        name = _grad_name(n).lower()
        if n.type == _tp.OPTYPE.RESHAPE or "permute" in name or "transpose" in name or len(seen) > limit:
            return True
        stack.extend(n.inputs)
    return False


def _fix_flatten_mappings(graph) -> None:
    """Map conv -> flatten -> linear indices where Torch-Pruning 1.6.1 does not.

    Torch-Pruning reads the flattened shape from ``grad_fn._saved_self_sizes``, which current
    PyTorch calls ``_saved_self_sym_sizes``; it then falls back to a global switch that turns the
    mapping off for every reshape as soon as one Linear sees a 3-D input (a transformer part), so
    a removed conv channel took one input column of the next Linear instead of H*W.  Here a
    reshape [N, C, *spatial] -> [N, C*prod(spatial)] whose input comes from C channels without a
    permute in between gets the block mapping (stride prod(spatial)).
    """
    if graph._2d_4d:
        return  # Torch-Pruning maps flattens itself then
    for node in list(graph.module2node.values()):
        if node.type != _tp.OPTYPE.RESHAPE or len(node.inputs) != 1:
            continue
        shapes = _shapes(node.grad_fn)
        if shapes is None:
            continue
        src, dst = shapes
        if len(src) < 3 or len(dst) != 2 or dst[0] != src[0] or dst[1] != math.prod(src[1:]) or dst[1] <= src[1]:
            continue
        in_node = node.inputs[0]
        if _tp.infer_out_channels(graph, in_node) != src[1] or _through_permute(in_node):
            continue
        stride = dst[1] // src[1]
        for dep in node.dependencies:
            if dep.target is in_node:
                dep.index_mapping[0] = _tp.FlattenIndexMapping(stride=stride, reverse=True)
        for dep in in_node.dependencies:
            if dep.target is node:
                dep.index_mapping[0] = _tp.FlattenIndexMapping(stride=stride, reverse=False)


class _ScalarOperands(torch.overrides.TorchFunctionMode):
    """Records the autograd nodes of operations whose only operands outside autograd are numbers
    or one-element tensors (``1.0 + tanh(x)``): autograd cannot tell them from ``x + buffer``."""

    def __init__(self):
        super().__init__()
        self.nodes: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        grad_fn = getattr(out, "grad_fn", None) if torch.is_tensor(out) else None
        if grad_fn is not None:
            operands = [a for a in list(args) + list((kwargs or {}).values()) if torch.is_tensor(a)]
            if all(a.requires_grad or a.numel() == 1 for a in operands):
                self.nodes.add(grad_fn)
        return out


def _meta_saved(t: torch.Tensor):
    """What the traced graph keeps of a tensor autograd saves for a backward that never runs:
    its shape on the meta device (a number stays itself; :func:`_tied_to_untraced` reads it).
    Without this, the graph built on a copy of the network holds every activation of the
    example's forward pass until it is dropped."""
    return t if t.numel() <= 1 else torch.empty(t.shape, dtype=t.dtype, device="meta")


class _OnMeta:
    """Within it, every parameter and buffer of ``model`` is a meta tensor of its shape (stand-ins
    in the modules' ``_parameters`` / ``_buffers``, the real ones put back on exit): a forward pass
    then builds the autograd graph Torch-Pruning traces without computing a value.
    ``real_of`` maps each parameter stand-in to its real parameter (for
    ``_torch_pruning.rebind_parameters``)."""

    def __init__(self, model):
        self.model = model
        self.slots: list = []  # (table, key, real tensor)
        self.real_of: dict = {}  # id(stand-in) -> real parameter

    def __enter__(self):
        standins: dict = {}
        for m in self.model.modules():
            for table in (m._parameters, m._buffers):
                for key, t in table.items():
                    if t is None:
                        continue
                    if id(t) not in standins:  # a tied tensor keeps one stand-in
                        s = torch.empty_like(t, device="meta")
                        if isinstance(t, nn.Parameter):
                            s = nn.Parameter(s, requires_grad=t.requires_grad)
                            self.real_of[id(s)] = t
                        standins[id(t)] = s
                    self.slots.append((table, key, t))
                    table[key] = standins[id(t)]
        return self

    def __exit__(self, *exc):
        for table, key, t in self.slots:
            table[key] = t
        self.slots = []


class _AttentionAsOnDevice(torch.overrides.TorchFunctionMode):
    """On the meta device, attention runs the kernel the model's device would pick: on CPU and
    CUDA ``scaled_dot_product_attention`` is one fused kernel (one autograd node) where available,
    and on the meta device it would decompose into matmuls and a softmax, a different graph.  On
    CPU the choice is asked of PyTorch (``torch._fused_sdp_choice`` on empty CPU tensors of the
    same shapes): the fused CPU kernel is called on the meta tensors, the math path decomposes as
    it would on the device.  Elsewhere (CUDA kernels) attention raises, and the model is traced on
    its own tensors."""

    SDPA = torch.nn.functional.scaled_dot_product_attention

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.multi_head_attention_forward:
            # a mode is off while it handles a call, so the attention inside is not seen: the
            # module's own name for it points here for the call
            functional = torch.nn.functional
            functional.scaled_dot_product_attention = lambda *a, **k: self._attention(self.SDPA, *a, **k)
            try:
                return func(*args, **kwargs)
            finally:
                functional.scaled_dot_product_attention = self.SDPA
        if func is self.SDPA:
            return self._attention(func, *args, **kwargs)
        return func(*args, **kwargs)

    def _attention(self, func, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **rest):
        if self.device.type != "cpu" or rest.get("enable_gqa"):
            raise NotImplementedError("attention is traced on the model's device")
        on_cpu = [torch.empty(t.shape, dtype=t.dtype).requires_grad_(t.requires_grad) if torch.is_tensor(t) else t
                  for t in (query, key, value, attn_mask)]  # (a mask that needs a gradient rules the fused kernel out)
        choice = torch._fused_sdp_choice(*on_cpu, dropout_p, is_causal, scale=scale)
        backends = torch.nn.attention.SDPBackend
        if choice == backends.MATH.value:
            return func(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **rest)
        if choice == backends.FLASH_ATTENTION.value:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]
        raise NotImplementedError(f"attention backend {choice} is traced on the model's device")


def _attributes(model) -> dict:
    """Each module's own attributes (not its parameters, buffers or submodules), by reference."""
    return {id(m): {k: v for k, v in vars(m).items() if not k.startswith("_")} for m in model.modules()}


def _undo_forward_state(model, before: dict) -> None:
    """Put back what a forward pass on the meta device changed in ``model``: attributes set or
    added (torchvision's anchor generator moves its cell anchors to the input's device, a rotary
    table is cached), buffers registered, meta entries put in a dict attribute (a cache)."""
    for m in model.modules():
        old = before.get(id(m), {})
        for k, v in [(k, v) for k, v in vars(m).items() if not k.startswith("_")]:
            if k not in old:
                object.__delattr__(m, k)
            elif old[k] is not v:
                object.__setattr__(m, k, old[k])
            elif isinstance(v, dict):
                for key in [key for key, x in v.items() if torch.is_tensor(x) and x.is_meta]:
                    del v[key]
        for table in (m._parameters, m._buffers):
            for key in [key for key, x in table.items() if torch.is_tensor(x) and x.is_meta]:
                del table[key]


def _trace(model, example_inputs):
    scalars = _ScalarOperands()
    with torch.enable_grad(), scalars, torch.autograd.graph.saved_tensors_hooks(_meta_saved, lambda t: t):
        # forward_fn: Torch-Pruning's own call retries after a bare `except`, hiding the real error;
        # only the output's tensors (a Hugging Face Cache object in it breaks Torch-Pruning's tracing)
        custom = {type(m): _tp.TRANSPOSED_LINEAR_PRUNER for m in model.modules() if is_transposed_linear(m)}
        graph = _tp.new_graph().build_dependency(
            model, example_inputs=example_inputs, forward_fn=_output_tensors, verbose=False,
            customized_pruners=custom or None,
        )
    return graph, scalars


def _build_graph(model, example_inputs):
    """Torch-Pruning's dependency graph of ``model`` traced on ``example_inputs``: on the meta
    device first (shapes only, no arithmetic: a 644 M-parameter RegNet traces in a fraction of its
    forward pass), else, where the forward pass needs values (a detector's proposals, ``.item()``),
    on the model's own tensors."""
    was_training = model.training
    model.eval()
    try:
        try:
            device = next((t.device for t in (*model.parameters(), *model.buffers())), torch.device("cpu"))
            before = _attributes(model)
            try:
                with _OnMeta(model) as meta, _AttentionAsOnDevice(device):
                    graph, scalars = _trace(model, _map_inputs(
                        lambda x: torch.empty_like(x, device="meta") if torch.is_tensor(x) else x, example_inputs))
            finally:
                _undo_forward_state(model, before)
            _tp.rebind_parameters(graph, meta.real_of)
        except ImportError:
            raise
        except Exception:  # a value was needed: trace for real
            graph, scalars = _trace(model, example_inputs)
    finally:
        model.train(was_training)
    for node in graph.module2node.values():
        node._bayesprune_scalar_ops = scalars.nodes
    _fix_flatten_mappings(graph)
    return graph


# ---------------------------------------------------------------------------------------------
# folding E[theta] * mask into weights


def _scale_rows(module: nn.Module, scale: torch.Tensor) -> None:
    """Scale output structure i (a weight row; a column of a transposed Linear) and its bias."""
    shape = (1, -1) if is_transposed_linear(module) else (-1,) + (1,) * (module.weight.ndim - 1)
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
    # only what lies downstream of the layer reads the noisy tensor: the group also holds layers
    # coupled to it upstream (an SE block's gate multiplies the tensor that its fc1 reads)
    reach, stack = set(), list(graph.module2node[layer].outputs)
    while stack:
        node = stack.pop()
        if id(node) in reach:
            continue
        reach.add(id(node))
        if not is_prunable(node.module):
            stack.extend(node.outputs)
    items = [(dep, pairs) for dep, pairs in _items(group) if id(dep.target) in reach]
    # a depthwise conv reading the structures is in the group by its outputs (Torch-Pruning couples
    # its input and output channels): its filter i reads structure i, and what lies after it reads
    # its output, not the noisy tensor
    downstream, depthwise = set(), []
    for dep, pairs in items:
        mod = dep.target.module
        if (mod is not layer and isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.groups == mod.in_channels
                and mod.groups > 1 and graph.is_out_channel_pruning_fn(dep.handler)):
            depthwise.append((mod, pairs))
            stack = list(dep.target.outputs)
            while stack:
                node = stack.pop()
                if id(node) not in downstream:
                    downstream.add(id(node))
                    stack.extend(node.outputs)
    for mod, pairs in depthwise:
        if any(r is None or not 0 <= r < len(scale) for _, r in pairs):
            raise NotImplementedError(f"cannot map the structures of {type(layer).__name__} to the inputs of {mod}")
        for i, r in pairs:
            mod.weight[i] *= scale[r].to(mod.weight.dtype)
        found = True
    for dep, pairs in items:
        mod = dep.target.module
        if mod is layer or not is_prunable(mod) or graph.is_out_channel_pruning_fn(dep.handler):
            continue
        if id(dep.target) in downstream:
            continue
        if any(r is None or not 0 <= r < len(scale) for _, r in pairs):
            raise NotImplementedError(f"cannot map the structures of {type(layer).__name__} to the inputs of {mod}")
        cols, roots = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2).T
        w = mod.weight
        groups = getattr(mod, "groups", 1)
        if is_transposed_linear(mod):  # input j is weight row j
            w[cols] = w[cols] * scale[roots].to(w.dtype).view(-1, 1)
        elif groups == 1:
            shape = (1, -1) + (1,) * (w.ndim - 2)
            w[:, cols] = w[:, cols] * scale[roots].to(w.dtype).view(shape)
        else:  # input channel c of a grouped conv is column c % (in/g) of its group's output rows
            per_in, per_out = w.shape[1], w.shape[0] // groups
            for c, r in zip(cols.tolist(), roots.tolist()):
                g = c // per_in
                w[g * per_out:(g + 1) * per_out, c % per_in] *= scale[r].to(w.dtype)
        found = True
    if not found:
        raise NotImplementedError(
            "noise after a non-homogeneous activation whose output feeds no Linear/Conv layer cannot be folded"
        )


def _fold_site(model, entry) -> nn.Module | None:
    """Where E[theta] * mask folds: the layer or its BatchNorm when only positively homogeneous
    modules (ReLU, pooling, ...) follow it in the chain; None: into the consumers."""
    chain = [model.get_submodule(n) for n in entry["chain"]]
    if len(chain) > 2 and isinstance(chain[-2], _BN_TYPES) and chain[-1] is getattr(chain[-2], "drop", None):
        return chain[-2]  # between a fused BatchNorm's affine and its activation: act(drop(BN(x)) * s)
    while len(chain) > 1 and isinstance(chain[-1], _HOMOGENEOUS):
        chain.pop()
    site = chain[-1]
    if isinstance(site, _BN_TYPES) and not all(isinstance(c, _HOMOGENEOUS + (nn.Dropout,)) for c in site.children()):
        return None  # a fused BatchNorm + activation (timm's BatchNormAct2d) whose activation is not homogeneous
    return site if site is chain[0] or isinstance(site, _BN_TYPES) else None


def _fold(graph, model, entry) -> None:
    site, scale = _fold_site(model, entry), entry["scale"]
    if site is None:
        _fold_into_consumers(graph, model.get_submodule(entry["layer"]), scale)
    else:
        (_fold_into_bn if isinstance(site, _BN_TYPES) else _scale_rows)(site, scale)


# ---------------------------------------------------------------------------------------------
# removal


def _vetoes(graph, layer, removed, masks, name_of) -> tuple:
    """The pruning group of ``removed`` (output structures of ``layer``) and the roots among them
    that must stay: Torch-Pruning lost their root index or mapped them out of range, they reach a
    LayerNorm/GroupNorm or an operand it cannot prune, or a coupled layer keeps them."""
    fn = _out_pruner(layer)
    group = graph.get_pruning_group(layer, fn, idxs=removed)
    veto = set()
    for dep, pairs in _items(group):
        mod, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
        if any(r is None for _, r in pairs):  # Torch-Pruning lost the root indices: keep them all
            veto.update(removed)
            continue
        size = _dim_size(mod, out)
        if size is not None:  # an index mapping Torch-Pruning got wrong (e.g. a Linear viewed as tokens)
            veto.update(r for i, r in pairs if not 0 <= i < size)
        if isinstance(mod, _CROSS_CHANNEL_NORMS) or _tied_to_untraced(dep.target):
            veto.update(r for _, r in pairs)
        elif mod is not layer and is_prunable(mod) and out:
            other = masks.get(name_of.get(id(mod)))
            other = None if other is None else other.tolist()  # per-element tensor reads are slow
            veto.update(r for i, r in pairs if other is None or not 0 <= i < len(other) or other[i] != 0)
    return group, veto


def _equal_groups(conv, rows: set, ins: set) -> tuple[set, set]:
    """Of the rows (output channels) and inputs of a grouped convolution that could be removed,
    those whose removal leaves a grouped convolution: every group whose rows and inputs all go
    (one group stays), and of the other groups the same number of rows from each (the lowest
    indices first) and the same number of inputs from each, at most b - 2 of the b rows (b - 1
    when one group is left: Torch-Pruning takes a convolution with as many groups as outputs for
    depthwise) and a - 1 of the a inputs."""
    G = conv.groups
    b, a = conv.out_channels // G, conv.in_channels // G
    row_of = [sorted(r for r in rows if r // b == g) for g in range(G)]
    in_of = [sorted(c for c in ins if c // a == g) for g in range(G)]
    whole = [g for g in range(G) if len(row_of[g]) == b and len(in_of[g]) == a]
    if len(whole) == G:
        whole = whole[:-1]  # Torch-Pruning cannot empty a layer: one group stays
    rest = [g for g in range(G) if g not in whole]
    k_out = min(min(len(row_of[g]) for g in rest), b - (2 if len(rest) > 1 else 1))
    k_in = min(min(len(in_of[g]) for g in rest), a - 1)
    ok_rows = {r for g in whole for r in row_of[g]} | {r for g in rest for r in row_of[g][:max(k_out, 0)]}
    ok_ins = {c for g in whole for c in in_of[g]} | {c for g in rest for c in in_of[g][:max(k_in, 0)]}
    return ok_rows, ok_ins


def _grouped_conv_blocks(graph, model, entries, masks, name_of, allowed) -> dict[str, set]:
    """Per noise layer, the masked structures that stay because removing them would leave some
    grouped convolution's groups unequal (:func:`_equal_groups`, applied to the rows and inputs
    that all the layers' removals reach together, until nothing changes)."""
    convs = {id(m): m for m in model.modules() if _tp.is_grouped_conv(m)}
    if not convs:
        return {}
    drags: dict[str, dict[int, list]] = {}
    for e in entries:
        name = e["layer"]
        removed = torch.nonzero(masks[name] == 0).flatten().tolist()
        if name not in allowed or not removed:
            continue
        layer = model.get_submodule(name)
        try:
            group, veto = _vetoes(graph, layer, removed, masks, name_of)
        except _tp.GroupCannotBeMapped:  # _remove_structures keeps this layer's structures
            continue
        roots = [r for r in removed if r not in veto]
        if len(roots) >= _dim_size(layer, True):
            roots = roots[1:]  # as _remove_structures: one zeroed unit stays
        reach = {r: [] for r in roots}
        for dep, pairs in _items(group):
            if id(dep.target.module) in convs:
                out = graph.is_out_channel_pruning_fn(dep.handler)
                for i, r in pairs:
                    if r in reach:
                        reach[r].append((id(dep.target.module), out, i))
        if any(reach.values()):
            drags[name] = reach
    free = {name: set(reach) for name, reach in drags.items()}
    while True:
        hit = {(c, out): set() for c in convs for out in (True, False)}
        for name, reach in drags.items():
            for r in free[name]:
                for c, out, i in reach[r]:
                    hit[c, out].add(i)
        ok = {}
        for c, conv in convs.items():
            ok[c, True], ok[c, False] = _equal_groups(conv, hit[c, True], hit[c, False])
        changed = False
        for name, reach in drags.items():
            bad = {r for r in free[name] if any(i not in ok[c, out] for c, out, i in reach[r])}
            if bad:
                free[name] -= bad
                changed = True
        if not changed:
            return {name: set(reach) - free[name] for name, reach in drags.items()}


class _LayerRemovalFailed(RuntimeError):
    """Torch-Pruning raised while removing one noise layer's structures: ``layer`` names it (the
    model is then half pruned and is thrown away; shrink keeps that layer and tries again)."""

    def __init__(self, layer: str, error: Exception):
        super().__init__(f"{type(error).__name__}: {error}")
        self.layer = layer


def _remove_structures(model, example_inputs, entries, allowed, unsettled: dict | None = None) -> tuple[list, dict]:
    """Remove masked structures of the layers named in ``allowed`` (in place).

    Returns the Torch-Pruning steps and, per noise layer, the original indices that remain.
    A layer whose removal Torch-Pruning cannot map (_torch_pruning.GroupCannotBeMapped) keeps its
    structures; ``unsettled`` (a dict) then gets its name and the reason, and a later call with the
    same dict keeps it without mapping it again (the same architecture and mask: the twin with
    random BatchNorm statistics, a retry without some layer: a MaxViT's groups through its window
    and grid partitions cost most of its shrink each time).  Any other error Torch-Pruning raises
    for one layer's group comes out as :class:`_LayerRemovalFailed`.
    """
    graph = _build_graph(model, example_inputs)
    name_of = {id(model.get_submodule(e["layer"])): e["layer"] for e in entries}
    masks = {e["layer"]: e["mask"].clone() for e in entries}
    kept = {e["layer"]: torch.arange(len(e["mask"])) for e in entries}
    if unsettled:  # kept already (see above): not mapped again for the grouped convolutions either
        allowed = set(allowed) - set(unsettled)
    blocked = _grouped_conv_blocks(graph, model, entries, masks, name_of, allowed)
    steps = []
    for e in entries:
        name = e["layer"]
        removed = torch.nonzero(masks[name] == 0).flatten().tolist()
        if name not in allowed or not removed:
            continue
        try:
            steps.extend(_remove_layer(graph, model, name, removed, masks, kept, name_of, blocked, unsettled))
        except ImportError:
            raise
        except Exception as e:  # the model is half pruned now: the caller starts again without this layer
            raise _LayerRemovalFailed(name, e) from e
    dead = {e["layer"] for e in entries if not bool(masks[e["layer"]].any())}
    for e in entries:
        if e["layer"] in dead and e["layer"] in allowed:
            try:
                steps.extend(_remove_dead_inputs(graph, model, e, masks, kept, name_of, dead))
            except ImportError:
                raise
            except Exception as err:
                raise _LayerRemovalFailed(e["layer"], err) from err
    _tp.finish_grouped_convs(model)
    return steps, kept


def _remove_dead_inputs(graph, model, entry, masks, kept, name_of, dead) -> list:
    """A layer all of whose output structures are masked computes zeros (folded: its rows, or its
    BatchNorm's scale and shift, are zero; else its noise multiplies by a zero mask), whatever it
    reads: its input structures go too, with the structures that only they use (the hidden units
    of an MLP whose output layer is masked whole; a residual branch whose last layer is).  An input
    that a live layer also reads, that reaches a LayerNorm/GroupNorm or a grouped convolution, or
    that an untraced operand ties, stays; so does one input (Torch-Pruning cannot empty a layer).
    docs/shrink.md, "Dead layers"."""
    name = entry["layer"]
    layer = model.get_submodule(name)
    if (layer not in graph.module2node or _grouped(layer)
            or any(len(graph.module2node[model.get_submodule(c)].outputs) != 1  # the chain feeds only the noise
                   for c in entry["chain"][:-1] if model.get_submodule(c) in graph.module2node)):
        return []
    n_in = _dim_size(layer, False)
    if not n_in or n_in < 2:
        return []
    fn = _in_pruner(layer)
    try:
        group = graph.get_pruning_group(layer, fn, idxs=list(range(n_in)))
    except _tp.GroupCannotBeMapped:  # (a ViT's attention output: its inputs run through the heads' reshape)
        return []
    veto = set()
    for dep, pairs in _items(group):
        mod, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
        if any(r is None for _, r in pairs):
            return []
        size = _dim_size(mod, out)
        if size is not None:
            veto.update(r for i, r in pairs if not 0 <= i < size)
        if (isinstance(mod, _CROSS_CHANNEL_NORMS) or _tied_to_untraced(dep.target)
                or _grouped(mod)):
            veto.update(r for _, r in pairs)
        elif not out and mod is not layer and is_prunable(mod) and name_of.get(id(mod)) not in dead:
            veto.update(r for _, r in pairs)  # a live layer reads these inputs
    removing = [i for i in range(n_in) if i not in veto]
    if len(removing) >= n_in:
        removing = removing[1:]  # Torch-Pruning cannot empty a layer: one input stays
    if not removing:
        return []
    group = graph.get_pruning_group(layer, fn, idxs=removing)
    for dep, pairs in _items(group):  # a noise layer upstream loses the outputs only the dead layer read
        other = name_of.get(id(dep.target.module))
        if other is not None and graph.is_out_channel_pruning_fn(dep.handler):
            keep = torch.ones(len(masks[other]), dtype=torch.bool)
            keep[[i for i, _ in pairs]] = False
            masks[other], kept[other] = masks[other][keep], kept[other][keep]
    group.prune(record_history=False)
    return [[name, False, [int(i) for i in removing]]]


NOT_IN_GRAPH = ("it is not in Torch-Pruning's dependency graph (its output does not depend on the example inputs, "
                "as a layer run on a constant table: Swin V2's position-bias MLP): its structures cannot be removed")


def _remove_layer(graph, model, name, removed, masks, kept, name_of, blocked, unsettled) -> list:
    """Remove the masked output structures ``removed`` of noise layer ``name`` and the structures
    coupled to them (in place; ``masks`` and ``kept`` follow).  Returns its Torch-Pruning step, if any."""
    layer, fn = model.get_submodule(name), _out_pruner(model.get_submodule(name))
    if layer not in graph.module2node:
        if unsettled is not None:
            unsettled[name] = f"kept: {NOT_IN_GRAPH}"
        return []
    try:
        _, veto = _vetoes(graph, layer, removed, masks, name_of)
    except _tp.GroupCannotBeMapped as e:
        if unsettled is not None:
            unsettled[name] = f"kept: {e}"
        return []
    if blocked.get(name):  # original indices that stay for a grouped convolution's sake
        origin = kept[name].tolist()
        veto.update(i for i in removed if origin[i] in blocked[name])
    removing = [i for i in removed if i not in veto]
    if len(removing) >= _dim_size(layer, True):
        removing = removing[1:]  # Torch-Pruning cannot empty a layer; one zeroed unit stays
    if not removing:
        return []
    group = graph.get_pruning_group(layer, fn, idxs=removing)
    for dep, pairs in _items(group):  # keep every stored mask aligned with its layer's remaining outputs
        other = name_of.get(id(dep.target.module))
        if other is not None and graph.is_out_channel_pruning_fn(dep.handler):
            keep = torch.ones(len(masks[other]), dtype=torch.bool)
            keep[[i for i, _ in pairs]] = False
            masks[other], kept[other] = masks[other][keep], kept[other][keep]
    group.prune(record_history=False)
    return [[name, True, [int(i) for i in removing]]]


def replay_pruning(model: nn.Module, example_inputs, steps) -> nn.Module:
    """Apply recorded removal ``steps`` to a fresh copy of the original architecture (in place)."""
    graph = _build_graph(model, example_inputs)
    graph.load_pruning_history([list(s) for s in steps])
    _tp.finish_grouped_convs(model)
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


def _entry(noise) -> dict:
    """What removal needs of a noise module: its layer, chain, mask and E[theta] * mask."""
    return {
        "layer": noise.layer_name,
        "chain": list(noise.chain or [noise.layer_name]),
        "mask": noise.mask.detach().clone().cpu(),
        "scale": (noise.expected_theta().double() * noise.mask.double()).detach(),
        "noise": noise,
    }


def _fold_all(m, entries, example_inputs) -> None:
    """Fold every entry's E[theta] * mask into ``m`` (its noise modules removed)."""
    graph = None
    for e in entries:
        if graph is None and _fold_site(m, e) is None:
            graph = _build_graph(m, example_inputs)  # only consumer folding needs the graph
        _fold(graph, m, e)


def _unweighted_use(model, chain, example_inputs) -> str:
    """', but ...' when the output of the ``chain`` (module names, layer first) reaches an addition
    or subtraction before any Linear/Conv layer (a residual sum: no weight can take a scale of one
    of its terms).  Followed from the chain's last module in Torch-Pruning's graph (an activation
    module is no node there: the BatchNorm before it is)."""
    try:
        graph = _build_graph(model, example_inputs)
    except Exception:  # only a hint
        return ""
    node = next((graph.module2node[m] for m in map(model.get_submodule, reversed(chain)) if m in graph.module2node), None)
    stack, seen = list(node.outputs) if node is not None else [], set()
    while stack:
        n = stack.pop()
        if id(n) in seen or is_prunable(n.module):
            continue
        seen.add(id(n))
        op = _grad_name(n)
        if op.startswith(("AddBackward", "SubBackward")):
            return f", but it also reaches an element-wise {op} (e.g. a residual sum) before any layer"
        stack.extend(n.outputs)
    return ""


def _fold_where(model, entry, example_inputs) -> str:
    """Where an entry's E[theta] * mask is folded, in words."""
    site = _fold_site(model, entry)
    after = entry["chain"][-1]
    what = f"its noise after {after} ({type(model.get_submodule(after)).__name__})"
    if site is None:
        return f"{what}, folded into the input weights of the layers that read it{_unweighted_use(model, entry['chain'], example_inputs)}"
    name = next(n for n in entry["chain"] if model.get_submodule(n) is site)
    return f"{what}, folded into {name} ({type(site).__name__})"


@torch.no_grad()
def _inexact_folds(model, example_inputs) -> dict[str, str]:
    """The noise layers of ``model`` whose fold alone is inexact, with where it was folded and the
    difference: found by halving over the layers, each check folding only some layers' E[theta] *
    mask into a copy whose other noise modules multiply by 1."""
    names = [n.layer_name for n in noise_layers(model)]
    probes = _ProbeList(_probes(example_inputs))
    found: dict[str, str] = {}

    def check(group):
        m = copy.deepcopy(model)
        _freeze_noise(m)
        for noise in noise_layers(m):
            if noise.layer_name not in group:
                noise.forward = lambda h: h  # left out of this check
        reference = _eval_outputs(m, probes)
        entries = [_entry(n) for n in noise_layers(m) if n.layer_name in group]
        _freeze_noise(m, frozen=False)
        remove_noise(m)
        try:
            _fold_all(m, entries, example_inputs)
        except ImportError:
            raise
        except Exception as e:
            return f"the fold failed: {type(e).__name__}: {e}"
        return _mismatch(reference, m, probes)

    def search(group):
        if not group:
            return
        why = check(set(group))
        if why is None:
            return
        if len(group) == 1:
            m = copy.deepcopy(model)
            noise = next(n for n in noise_layers(m) if n.layer_name == group[0])
            entry = _entry(noise)
            remove_noise(m)
            found[group[0]] = f"{_fold_where(m, entry, example_inputs)}: {why}"
            return
        search(group[:len(group) // 2])
        search(group[len(group) // 2:])

    search(names)
    return found


def _splits(shapes, n: int) -> bool:
    """Whether a reshape of ``shapes`` = (input, output) splits an input dimension of size ``n``
    into several (``[B, N, 3 * heads * d] -> [B, N, 3, heads, d]``): the leading and trailing
    dimensions kept, ``n`` spread over two or more output dimensions larger than 1."""
    src, dst = shapes
    for d, size in enumerate(src):
        if size != n:
            continue
        tail = len(src) - d - 1
        middle = dst[d:len(dst) - tail]
        if (tuple(dst[:d]) == tuple(src[:d]) and tuple(dst[len(dst) - tail:]) == tuple(src[d + 1:])
                and math.prod(middle) == n and sum(v > 1 for v in middle) >= 2):
            return True
    return False


def _predicted_inexact(model, entries, example_inputs) -> dict[str, str]:
    """The masked layers whose removal is known inexact without trying it, with the reason, found
    on Torch-Pruning's graph from the layer's output up to the next Linear/Conv layer:

    * it reaches a BatchNorm other than its own (in its noise chain): a removed (zero) channel is
      the constant ``bias - mean * weight / sqrt(var + eps)`` after that BatchNorm, not zero, and
      what the layers after it take of that constant goes with the channel (a DenseNet's
      concatenated features, a transition's pooled output); inexact with the random BatchNorm
      statistics shrink checks with;
    * it reaches a reshape that splits its structures' dimension into several (a fused q/k/v
      projection's ``[B, N, 3, heads, head_dim]``, a channel shuffle): removing single features
      breaks that shape (attention heads are structures of their own: :func:`bayesprune.add_head_noise`).

    Shrink keeps them without searching for them one by one (the search costs a removal and a
    verification per attempt: 74 attempts, 119 s on a timm ViT-S/16, against 4)."""
    try:
        graph = _build_graph(model, example_inputs)
    except Exception:  # only a shortcut: the search then finds them (and reports the error)
        return {}
    found = {}
    for e in entries:
        if not bool((e["mask"] == 0).any()):
            continue
        chain = {id(model.get_submodule(n)) for n in e["chain"]}
        start = graph.module2node.get(model.get_submodule(e["layer"]))
        if start is None:  # _remove_layer keeps it (NOT_IN_GRAPH)
            continue
        n = e["mask"].numel()
        stack, seen = list(start.outputs), set()
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            mod = node.module
            if isinstance(mod, _BN_TYPES) and id(mod) not in chain:
                bn = next((n for n, x in model.named_modules() if x is mod), type(mod).__name__)
                found[e["layer"]] = (f"its masked structures reach BatchNorm {bn} before any Linear/Conv layer: a removed "
                                     "channel is that BatchNorm's constant there, not zero")
                break
            shapes = _shapes(node.grad_fn) if node.type == _tp.OPTYPE.RESHAPE else None
            if shapes is not None and _splits(shapes, n):
                found[e["layer"]] = (f"a reshape {list(shapes[0])} -> {list(shapes[1])} splits its {n} structures over several "
                                     "dimensions (attention heads?): removing single ones breaks that shape; "
                                     "bayesprune.add_head_noise makes whole heads the structures")
                break
            if not is_prunable(mod) or id(mod) in chain:
                stack.extend(node.outputs)
    return found


def _shrink(model, example_inputs, fold: bool, keep_noise: bool, verify: bool, assume_safe=frozenset()):
    example_inputs = _example(model, example_inputs)
    if _heads.head_noise_layers(model):  # attention heads are removed first (heads.py), the rest below
        return _heads.shrink_heads(model, example_inputs, lambda m: _shrink(m, example_inputs, fold, keep_noise, verify, assume_safe),
                                   fold=fold, keep_noise=keep_noise, verify=verify)
    m = copy.deepcopy(model)
    layers = noise_layers(m)
    if not layers:
        raise ValueError("model has no noise layers: nothing to shrink (call bayesprune.add_noise first)")
    entries = []
    for noise in layers:
        noise.check_finite()
        entries.append(_entry(noise))
    values = fold or keep_noise
    probes = _ProbeList(_probes(example_inputs) if values else [_probe(example_inputs)])
    # the same removal on a twin with random BatchNorm statistics must be exact too; the twin is
    # remade from ``m`` (the same statistics each time) for each check and dropped after it
    twin = _randomised_bn(m) if verify and values else None
    # the twin's check is on one input: a zeroed channel feeding a BatchNorm gives its constant on any
    twin_probes = _ProbeList(probes[-1:])
    if verify:
        _freeze_noise(m)
        if twin is not None:
            _freeze_noise(twin)
    reference = _eval_outputs(m, probes) if verify else None
    if verify and values and not any(t.is_floating_point() and bool(t.ne(0).any()) for ref in reference for t in ref):
        warnings.warn(
            f"shrink's check compares no values: the model's outputs on all {len(probes)} verification inputs are empty "
            "or all zero (a detector that detects nothing? a zero-initialised head?), so only the network's shapes are "
            "checked; pass example inputs (and weights) for which the model produces outputs", ShrinkVerificationWarning,
            stacklevel=2)
    twin_reference = _eval_outputs(twin, twin_probes) if twin is not None else None
    del twin  # remade per check (folding touches no running statistics: the same random ones)
    _freeze_noise(m, frozen=False)  # its noise modules are carried on by shrink_for_training
    remove_noise(m)
    if fold:
        _fold_all(m, entries, example_inputs)
    names = [e["layer"] for e in entries]
    head_refs: dict = {}

    def heads_agree(base, trial, inputs) -> bool:
        """Whether the prediction heads' outputs (none pruned) of ``trial`` equal the unpruned
        masked model's: the model outputs are then a function of equal tensors, and a difference
        there is post-processing that turns float rounding into other results (a detector's
        score thresholds, top-k and NMS on near-tied scores)."""
        if "heads" not in head_refs:
            head_refs["heads"] = _prediction_heads(model, example_inputs) if values else []
        heads = head_refs["heads"]
        if not heads:
            return False
        if base not in head_refs:  # the masked model, or its twin with the same random statistics
            src = copy.deepcopy(model) if base == "masked" else _randomised_bn(model)
            _freeze_noise(src)
            head_refs[base] = _head_outputs(src, inputs, heads)
            del src
        try:
            got = _head_outputs(trial, inputs, heads)
        except Exception:
            return False
        return _mismatch(head_refs[base], None, inputs, values=True, rtol=rtol, outputs=got) is None

    def attempt(allowed):
        """Remove the structures of the ``allowed`` layers from a copy of ``m``: (that copy, its
        steps, None) when it is exact, else (None, None, why).  The twin with random BatchNorm
        statistics is checked first and dropped before the copy kept is made: at most three copies
        of the weights live at once (the model, ``m``, one trial)."""
        for base, ref, inputs in (("twin", twin_reference, twin_probes), ("masked", reference, probes)):
            if ref is None and base == "twin":
                continue
            trial = _randomised_bn(m) if base == "twin" else copy.deepcopy(m)
            try:
                steps, kept = _remove_structures(trial, example_inputs, entries, allowed, unsettled)
            except ImportError:  # Torch-Pruning missing or too old (first use): not an inexact layer
                raise
            except _LayerRemovalFailed as e:  # the layer is known: attributed() keeps it and goes on
                failed["layer"] = e.layer
                return None, None, f"removal failed: {e}"
            except Exception as e:  # a removal Torch-Pruning cannot map: keep that layer's structures
                return None, None, f"removal failed: {type(e).__name__}: {e}"
            if keep_noise:
                _reattach(trial, entries, kept)
            why = _mismatch(ref, trial, inputs, values=values, rtol=rtol) if verify else None
            if why is not None and values and not why.startswith("forward pass failed") and heads_agree(base, trial, inputs):
                why = None
            if why is not None:
                return None, None, why if base == "masked" else f"{why}, with random BatchNorm statistics"
            if base == "masked":
                return trial, steps, None
            del trial  # the twin's copy only answers whether the removal is exact: not held on

    def attributed(allowed):
        """``attempt(allowed)``, less each layer on whose pruning group Torch-Pruning raises (one
        retry per such layer, instead of a halving search for it)."""
        allowed = set(allowed)
        while True:
            failed.clear()
            out, steps, why = attempt(allowed)
            bad = failed.get("layer")
            if why is None or bad not in allowed:
                return out, steps, why
            refused[bad] = why
            allowed.discard(bad)

    refused = {}
    failed = {}  # the layer whose group Torch-Pruning raised on in the last attempt
    unsettled = {}  # layers kept because their pruning group does not settle (any attempt)
    rtol = VERIFY_RTOL
    out, steps, why = attributed(set(names))
    if why is not None and fold and verify:  # is the fold alone inexact? then no removal can be exact
        first = _mismatch(reference, m, probes)
        loose = _rounding_tolerance(model, example_inputs, reference, m, probes) if first is not None else None
        if loose is not None:  # exact in float64: the float network's own rounding, checked at that level
            rtol = loose
            out, steps, why = attributed(set(names) - set(refused))
            first = None
        if first is not None:
            bad = _inexact_folds(model, example_inputs)
            lines = "".join(f"\n  {n}: {w}" for n, w in bad.items())
            raise RuntimeError(
                f"shrink refuses the network: folding E[theta] * mask of {', '.join(bad) or 'no layer alone (only several together)'} "
                f"into the weights is inexact before any removal ({first}):{lines}"
            )
    predicted = dict(refused)  # layers known inexact, kept without searching for them
    if why is not None and values and verify:
        found = _predicted_inexact(m, [e for e in entries if e["layer"] not in predicted], example_inputs)
        if found:
            refused.update(found)
            out, steps, why = attributed(set(names) - set(refused))
        predicted.update(refused)
    if why is not None:  # find the layers whose removal breaks the network and keep theirs
        masked = [e["layer"] for e in entries if bool((e["mask"] == 0).any()) and e["layer"] not in predicted]

        def single(n):
            w = attempt({n})[2]
            if w is not None:
                refused[n] = w
            return w is None

        def bad_layers(group: list) -> list:
            """The layers of ``group`` whose removal alone is inexact, found by halving (a group
            that removes exactly clears all its layers in one attempt; a layer on whose group
            Torch-Pruning raises is named by the error, no halving for it)."""
            if not group:
                return []
            before = set(refused)
            w = attributed(set(group))[2]
            raised = [n for n in group if n in refused and n not in before]
            rest = [n for n in group if n not in raised]
            if w is None or not rest:
                return raised
            if len(rest) == 1:
                refused[rest[0]] = w
                return raised + rest
            return raised + halves(rest)

        def halves(group: list) -> list:
            half = len(group) // 2
            return bad_layers(group[:half]) + bad_layers(group[half:])

        suspects = [n for n in names if n in masked and n not in assume_safe]
        if len(suspects) != len(masked):
            bad = set(bad_layers(suspects))
        elif len(suspects) > 1:  # the first attempt was this whole group
            bad = set(halves(suspects))
        else:  # the first attempt tried the one masked layer alone
            bad = set(suspects)
            refused.update({n: why for n in suspects})
        safe = {n for n in names if n not in bad and n not in predicted}
        out, steps, why = attributed(safe)
        if why is not None:  # layers inexact only together: one at a time, as before
            refused.clear()
            masked = [e["layer"] for e in entries if bool((e["mask"] == 0).any())]
            safe = {n for n in names if n not in masked or n in assume_safe or single(n)}
            out, steps, why = attributed(safe)
        if why is not None and assume_safe:  # the analysis was wrong: check every layer
            refused.clear()
            safe = {n for n in names if n not in masked or single(n)}
            out, steps, why = attributed(safe)
        if why is not None:
            first = attempt(set())[2]
            what = ("folding E[theta] * mask into the weights is already inexact, before any removal ("
                    f"{first})") if first is not None else why
            raise RuntimeError(
                f"shrink could not reproduce the masked model's eval output: {what}; layers whose removal "
                f"alone was inexact: {', '.join(sorted(refused)) or 'none'}"
            )
    out.train(model.training)
    out.bayesprune_pruning = {**_input_spec(example_inputs), "steps": steps}
    if unsettled and values and verify:  # name the cause where the graph shows it (a reshape into heads)
        unsettled.update(_predicted_inexact(m, [e for e in entries if e["layer"] in unsettled], example_inputs))
    out.bayesprune_kept = {**unsettled, **refused}  # layers whose masked structures stay (zeroed): why
    if keep_noise:
        kept_input = stored_example_inputs(model)
        for noise in noise_layers(out):  # one shared input, as add_noise left it
            noise.example_inputs = kept_input if kept_input is not None else example_inputs
    return out


_SHRUNK: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _state_key(model, example_inputs) -> tuple:
    """Identifies the model's structure, parameters, buffers (by identity and version counter),
    plain attributes, hooks and the example input: equal keys mean shrink computes the same
    network."""
    tensors = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        tensors.append((name, id(t), t.data_ptr(), t._version, tuple(t.shape), t.dtype))
    ins = tuple((id(t), t.data_ptr(), t._version) for t in _tensors(example_inputs))
    plain = (bool, int, float, str, type(None))
    attrs = tuple(  # plain attributes that a forward may read (e.g. a flag) and the hooks
        (tuple(sorted((k, v) for k, v in vars(mod).items() if isinstance(v, plain) and k != "training")),
         tuple(mod._forward_hooks), tuple(mod._forward_pre_hooks))
        for mod in model.modules()
    )
    return _signature(model, example_inputs), tuple(tensors), ins, attrs


@torch.no_grad()
def _cached_shrink(model, example_inputs) -> nn.Module:
    """``shrink(model, example_inputs)`` (fold, verified), computed once per model state."""
    example_inputs = _example(model, example_inputs)
    key = _state_key(model, example_inputs)
    hit = _SHRUNK.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    out = _shrink(model, example_inputs, fold=True, keep_noise=False, verify=True)
    _SHRUNK[model] = (key, out)
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
    _install_joint_draw(model)


@torch.no_grad()
def shrink(model: nn.Module, example_inputs=None, *, fold: bool = True, verify: bool = True,
           round_to: int | None = None, uniform_heads: bool | int = False) -> nn.Module:
    """A plain ``nn.Module`` without noise layers and without the masked structures.

    Its eval output equals the masked model's eval output (``fold=True``; checked when ``verify``
    on several inputs, also with random BatchNorm statistics, to ``VERIFY_RTOL`` of the output
    scale).  ``fold=False`` only removes structures (used to count
    parameters; then only output shapes are checked).  The input model is left untouched.
    ``example_inputs``: another input than the one given to ``add_noise``.  A layer whose removal
    would not be exact keeps its masked structures (zeroed): ``result.bayesprune_kept`` maps its
    name to the reason.
    ``round_to=k``: first round a copy's masks up to multiples of k per layer or coupled group,
    highest BMRS_N keep scores first (:func:`bayesprune.pruning.round_masks`); the output then
    equals that copy's masked output.
    ``uniform_heads=True`` (or a head count): first make a copy's head masks keep the same heads
    in every attention (:func:`bayesprune.heads.uniform_heads`), and set a Hugging Face model's
    config to them (:func:`bayesprune.heads.update_hf_config`, which raises where its config
    cannot say so) so that ``save_pretrained`` / ``from_pretrained`` reload it.
    """
    uniform_heads = _heads.check_uniform(uniform_heads)
    if round_to is not None:
        from .pruning import round_masks  # pruning imports this module

        model = copy.deepcopy(model)
        round_masks(model, round_to, example_inputs=example_inputs)
    if uniform_heads is not None:
        model = copy.deepcopy(model)
        _heads.uniform_heads(model, uniform_heads, example_inputs=example_inputs)
    if fold and verify:  # computed once per model state (remaining_parameters counts this network)
        out = copy.deepcopy(_cached_shrink(model, example_inputs))
        out.train(model.training)
    else:
        out = _shrink(model, example_inputs, fold=fold, keep_noise=False, verify=verify)
    if uniform_heads is not None and hasattr(out, "config") and hasattr(out, "save_pretrained"):
        _heads.update_hf_config(out)
    return out


@torch.no_grad()
def shrink_for_training(model: nn.Module, example_inputs=None, *, verify: bool = True) -> nn.Module:
    """A smaller copy that keeps its noise layers, for training on after pruning.

    Masked structures are removed as in :func:`shrink` with their noise entries (``mu``,
    ``log_sigma``, ``mask``); nothing is folded, so the kept structures keep their posterior
    and mask.  The new model has new parameters: rebuild the optimizer (and any scheduler or
    EMA state that refers to parameters) after calling this, and give it the old state with
    :func:`carry_optimizer_state`.
    """
    return _shrink(model, example_inputs, fold=False, keep_noise=True, verify=verify)


@torch.no_grad()
def parameter_origins(model: nn.Module, shrunk: nn.Module) -> dict[str, torch.Tensor]:
    """Where each parameter of ``shrunk = shrink_for_training(model, ...)`` comes from.

    For every parameter name of ``shrunk``, the flat indices ``i`` into ``model``'s parameter of
    that name with ``shrunk_param.flatten() == model_param.flatten()[i]``: found by replaying
    the recorded removal steps on a float64 copy of ``model`` whose parameters hold their own
    flat indices.  Used to carry optimiser state (Adam's moments) across a shrink.
    """
    spec = getattr(shrunk, "bayesprune_pruning", None)
    if spec is None:
        raise ValueError("the second model carries no removal steps: pass the result of shrink_for_training(model, ...)")
    tagged = copy.deepcopy(model)
    remove_noise(tagged)  # the steps were recorded on the network without its noise modules
    tagged.double()
    for p in tagged.parameters():
        p.copy_(torch.arange(p.numel(), dtype=torch.float64, device=p.device).view_as(p))
    device = next(tagged.parameters()).device
    example = _map_inputs(lambda x: (x.double() if x.is_floating_point() else x).to(device) if torch.is_tensor(x) else x,
                          example_from_spec(spec))
    _heads.replay_heads(tagged, spec.get("heads"))  # the steps were recorded without those heads
    replay_pruning(tagged, example, spec["steps"])
    origins = {name: p.long().flatten() for name, p in tagged.named_parameters()}
    origins.update(_heads.noise_origins(shrunk, spec.get("heads")))
    names = {id(m): name for name, m in shrunk.named_modules()}
    for noise in noise_layers(shrunk):  # its structures are the kept outputs of its layer
        if isinstance(noise, _heads.HeadNoise):
            continue  # its heads: noise_origins
        original, w = model.get_submodule(noise.layer_name), tagged.get_submodule(noise.layer_name).weight
        if is_transposed_linear(original):  # [in, out]: output j is column j, flat index i*nf + j
            kept = w[0].long() % original.nf
        else:
            kept = w.flatten(1)[:, 0].long() // original.weight[0].numel()
        for pname, p in noise.named_parameters(recurse=False):
            origins[f"{names[id(noise)]}.{pname}"] = kept
    return origins


def carry_optimizer_state(model, optimizer, shrunk, new_optimizer) -> None:
    """Give ``new_optimizer`` (built on ``shrunk = shrink_for_training(model, ...)``) the state
    ``optimizer`` holds for ``model``'s parameters, sliced to the entries that remain: per-entry
    tensors (Adam's ``exp_avg``, ``exp_avg_sq``) are indexed by
    :func:`~bayesprune.removal.parameter_origins`, scalars (``step``) are copied."""
    origins = parameter_origins(model, shrunk)
    old = dict(model.named_parameters())
    for name, p in shrunk.named_parameters():
        q = old.get(name)
        state = optimizer.state.get(q) if q is not None else None
        if not state or name not in origins:
            continue
        index = origins[name].to(p.device)
        new_optimizer.state[p] = {
            k: (v.flatten()[index].view_as(p).clone() if v.shape == q.shape else v.clone()) if torch.is_tensor(v) else v
            for k, v in state.items()
        }


def _signature(model, example_inputs) -> tuple:
    mods = []
    for name, mod in model.named_modules():
        if isinstance(mod, MultiplicativeNoise):
            mods.append((name, mod.layer_name, tuple(mod.chain or ()), mod.num_structures, mod.order))
        else:
            mods.append((name, type(mod), tuple((k, tuple(p.shape)) for k, p in mod._parameters.items() if p is not None)))
    ins = tuple((tuple(t.shape), t.dtype, str(t.device)) for t in _tensors(example_inputs))
    return tuple(mods), ins, type(example_inputs).__name__
