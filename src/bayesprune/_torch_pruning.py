"""Every use of Torch-Pruning goes through this module (public and private names alike).

bayesprune needs Torch-Pruning >= 1.5.0 (:data:`MIN_VERSION`).  Its private layout moved in 1.6.0:

* the flatten index mapping is ``torch_pruning.dependency.index_mapping._FlattenIndexMapping``
  from 1.6.0 and ``torch_pruning._helpers._FlattenIndexMapping`` in 1.5.x;
* the channel inference is ``torch_pruning.dependency.shape_infer.infer_out_channels_recursively
  (graph, node, depth)`` from 1.6.0 and the method ``DependencyGraph._infer_out_channels_recursively
  (node, depth)`` in 1.5.x.

Both layouts are handled here; anything missing raises an ``ImportError`` naming the version
needed.  Besides the names below, :mod:`bayesprune.removal` reads these attributes of Torch-Pruning
objects: ``DependencyGraph.module2node`` and ``._2d_4d``, a node's ``type``, ``inputs``, ``outputs``,
``dependencies`` and ``grad_fn``, a dependency's ``target``, ``handler`` and ``index_mapping``, a
group item's ``dep``, ``idxs`` and ``root_idxs`` (present in 1.5.0 to 1.6.1).  :func:`new_graph`
puts :data:`CONV_PRUNER` (a subclass of ``torch_pruning.pruner.function.ConvPruner``) into a
graph's own ``REGISTERED_PRUNERS`` table and its ``_in_channel_pruning_fn`` /
``_out_channel_pruning_fn`` sets, so that grouped convolutions are pruned group by group.
"""

from __future__ import annotations

import gc
import re
import sys
import threading
from importlib import metadata

import torch

__all__ = [
    "MIN_VERSION",
    "VERSION",
    "DependencyGraph",
    "FlattenIndexMapping",
    "OPTYPE",
    "count_ops_and_params",
    "infer_out_channels",
    "prune_conv_out_channels",
    "prune_linear_out_channels",
    "prune_linear_in_channels",
    "TransposedLinearPruner",
    "TRANSPOSED_LINEAR_PRUNER",
    "GroupedConvPruner",
    "CONV_PRUNER",
    "new_graph",
    "rebind_parameters",
    "finish_grouped_convs",
    "is_grouped_conv",
    "GroupCannotBeMapped",
    "GroupDoesNotSettle",
    "MAX_MAPPED_INDICES",
]

#: The oldest Torch-Pruning release bayesprune works with (its test suite passes on it).
MIN_VERSION = (1, 5, 0)
_NEED = "bayesprune needs Torch-Pruning >= {} (pip install 'torch-pruning>={}')".format(
    ".".join(map(str, MIN_VERSION)), ".".join(map(str, MIN_VERSION))
)


def _parse(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:3])


try:
    import torch_pruning as _tp
    from torch_pruning import ops as _ops
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"{_NEED}; importing it failed: {e}") from e

try:
    VERSION: str = metadata.version("torch-pruning")
except metadata.PackageNotFoundError:  # pragma: no cover - a source checkout without metadata
    VERSION = getattr(_tp, "__version__", "0")
if _parse(VERSION) < MIN_VERSION:
    raise ImportError(f"{_NEED}; found {VERSION}")


def _missing(what: str) -> ImportError:
    return ImportError(f"{_NEED}; Torch-Pruning {VERSION} has no {what}")


try:
    DependencyGraph = _tp.DependencyGraph
    prune_linear_out_channels = _tp.prune_linear_out_channels
    prune_linear_in_channels = _tp.prune_linear_in_channels
    prune_conv_out_channels = _tp.prune_conv_out_channels
    count_ops_and_params = _tp.utils.count_ops_and_params
    OPTYPE = _ops.OPTYPE
    _BasePruningFunc = _tp.pruner.function.BasePruningFunc
    _ConvPruner = _tp.pruner.function.ConvPruner
except AttributeError as e:  # pragma: no cover - depends on the installed version
    raise _missing(str(e)) from e

for _name in ("ELEMENTWISE", "RESHAPE", "CONCAT", "SPLIT", "EXPAND", "SLICE", "UNBIND"):
    if not hasattr(OPTYPE, _name):  # pragma: no cover
        raise _missing(f"torch_pruning.ops.OPTYPE.{_name}")
for _name in ("build_dependency", "get_pruning_group", "is_out_channel_pruning_fn", "is_in_channel_pruning_fn",
              "load_pruning_history"):
    if not callable(getattr(DependencyGraph, _name, None)):  # pragma: no cover
        raise _missing(f"DependencyGraph.{_name}")

try:  # 1.6.0 and later
    from torch_pruning.dependency.index_mapping import _FlattenIndexMapping as FlattenIndexMapping
    from torch_pruning.dependency.shape_infer import infer_out_channels_recursively as _infer_out_channels
except ImportError:
    try:  # 1.5.x
        from torch_pruning._helpers import _FlattenIndexMapping as FlattenIndexMapping
    except ImportError as e:  # pragma: no cover
        raise _missing("_FlattenIndexMapping (torch_pruning.dependency.index_mapping or torch_pruning._helpers)") from e
    if not callable(getattr(DependencyGraph, "_infer_out_channels_recursively", None)):  # pragma: no cover
        raise _missing("shape inference (dependency.shape_infer or DependencyGraph._infer_out_channels_recursively)")

    def _infer_out_channels(graph, node, recursive_depth):
        return graph._infer_out_channels_recursively(node, recursive_depth)


_shape_infer = sys.modules.get("torch_pruning.dependency.shape_infer")  # 1.6 and later (None: 1.5.x)
if _shape_infer is not None and callable(getattr(_shape_infer, "infer_out_channels_recursively", None)):
    _recursive_out_channels = _shape_infer.infer_out_channels_recursively

    def _out_channels_or_unknown(graph, node, recursive_depth):
        """Torch-Pruning's recursive output-channel inference, with None (unknown) where it indexes
        a split's sizes by an output position past them (a split whose outputs feed more nodes
        than it has parts: torchvision RetinaNet's and FCOS's per-level head split raised
        IndexError while building the graph, so no removal was possible)."""
        try:
            return _recursive_out_channels(graph, node, recursive_depth)
        except IndexError:
            return None

    _shape_infer.infer_out_channels_recursively = _out_channels_or_unknown  # its own recursion looks it up here too
    _infer_out_channels = _out_channels_or_unknown


def infer_out_channels(graph, node) -> int | None:
    """The number of output channels of ``node`` in ``graph`` as Torch-Pruning infers it (None: unknown)."""
    return _infer_out_channels(graph, node, [0])


class TransposedLinearPruner(_BasePruningFunc):
    """Torch-Pruning pruner for a Linear whose weight is stored ``[in, out]`` (Hugging Face's
    ``Conv1D``, ``y = x @ W + b``, with ``nf`` outputs and ``nx`` inputs): output structures are
    weight columns and bias entries, input structures weight rows.  Registered per class through
    ``build_dependency(customized_pruners=...)`` (see :func:`bayesprune.removal._build_graph`)."""

    TARGET_MODULES = None  # any class that bayesprune.selection.is_transposed_linear accepts

    def prune_out_channels(self, layer, idxs):
        keep = sorted(set(range(layer.nf)) - set(int(i) for i in idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
        if getattr(layer, "bias", None) is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        layer.nf = len(keep)
        return layer

    def prune_in_channels(self, layer, idxs):
        keep = sorted(set(range(layer.nx)) - set(int(i) for i in idxs))
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        layer.nx = len(keep)
        return layer

    def get_out_channels(self, layer):
        return layer.nf

    def get_in_channels(self, layer):
        return layer.nx


#: the one instance (Torch-Pruning tells out- from in-channel handlers by these bound methods)
TRANSPOSED_LINEAR_PRUNER = TransposedLinearPruner()


def is_grouped_conv(module) -> bool:
    """A (non-transposed) convolution with 1 < groups < out_channels: Torch-Pruning's OPTYPE.CONV
    with groups (it takes groups == out_channels for a depthwise convolution)."""
    import torch.nn as nn

    return (isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and 1 < module.groups
            and module.groups != module.out_channels) or hasattr(module, _STATE)


_STATE = "_bayesprune_grouped"  # removal in progress: which original group each row and input belongs to


class GroupedConvPruner(_ConvPruner):
    """Torch-Pruning's convolution pruner, with grouped convolutions pruned per group.

    A grouped convolution (G groups, a inputs and b outputs each) computes output row r of group
    g = r // b from the inputs g*a ... g*a + a - 1, with weight column j reading input g*a + j.
    Torch-Pruning's ``prune_in_channels`` keeps the first columns whatever group lost which
    inputs, and never changes ``groups``.  Here the rows and inputs removed are tracked per
    original group; once every remaining group has the same number of rows and of inputs (and
    the groups with rows are those with inputs) the weight is rebuilt, row by row from its own
    group's remaining columns, and ``groups`` is the number of remaining groups.  Between two
    such states (e.g. a whole group's rows removed, its inputs not yet) ``groups`` is 1 and the
    layer is not usable; :func:`finish_grouped_convs` raises if one is left so.  Other
    convolutions are pruned as by Torch-Pruning.
    """

    @staticmethod
    def _state(layer):
        st = getattr(layer, _STATE, None)
        if st is None:
            g = layer.groups
            b, a = layer.out_channels // g, layer.in_channels // g
            st = {"rows": [r // b for r in range(layer.out_channels)],
                  "ins": [c // a for c in range(layer.in_channels)],
                  "cols": [list(range(a)) for _ in range(g)]}
            setattr(layer, _STATE, st)
        return st

    def prune_out_channels(self, layer, idxs):
        if getattr(layer, "transposed", False) or not is_grouped_conv(layer):
            return super().prune_out_channels(layer, idxs)
        st = self._state(layer)
        drop = set(int(i) for i in idxs)
        keep = [r for r in range(layer.out_channels) if r not in drop]
        layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        st["rows"] = [st["rows"][r] for r in keep]
        layer.out_channels = len(keep)
        self._settle(layer, st)
        return layer

    def prune_in_channels(self, layer, idxs):
        if getattr(layer, "transposed", False) or not is_grouped_conv(layer):
            return super().prune_in_channels(layer, idxs)
        st = self._state(layer)
        drop = set(int(i) for i in idxs)
        position: dict[int, int] = {}
        gone: dict[int, set] = {}
        for c, g in enumerate(st["ins"]):  # input c is the p-th remaining input of its group g
            p = position.get(g, 0)
            position[g] = p + 1
            if c in drop:
                gone.setdefault(g, set()).add(p)
        for g, ps in gone.items():
            st["cols"][g] = [j for p, j in enumerate(st["cols"][g]) if p not in ps]
        st["ins"] = [g for c, g in enumerate(st["ins"]) if c not in drop]
        layer.in_channels = len(st["ins"])
        self._settle(layer, st)
        return layer

    @staticmethod
    def _settle(layer, st) -> None:
        import torch

        rows, ins = st["rows"], st["ins"]
        groups = sorted(set(rows))
        n_rows = {g: rows.count(g) for g in groups}
        n_ins = {g: ins.count(g) for g in groups}
        if (set(ins) != set(groups) or len(set(n_rows.values())) != 1 or len(set(n_ins.values())) != 1
                or any(len(st["cols"][g]) != n_ins[g] for g in groups)):
            layer.groups = 1  # not yet a valid grouped convolution (Torch-Pruning must not take it for depthwise)
            return
        w = layer.weight
        index = torch.tensor([st["cols"][g] for g in rows], dtype=torch.long, device=w.device)
        index = index.view(index.shape + (1,) * (w.ndim - 2)).expand((-1, -1) + tuple(w.shape[2:]))
        new = torch.nn.Parameter(torch.gather(w.detach(), 1, index), requires_grad=w.requires_grad)
        if w.grad is not None:
            new.grad = torch.gather(w.grad, 1, index)
        layer.weight = new
        layer.groups = len(groups)
        delattr(layer, _STATE)


#: Torch-Pruning's conv pruner for every convolution that is not depthwise (see :func:`new_graph`)
CONV_PRUNER = GroupedConvPruner()


class GroupCannotBeMapped(RuntimeError):
    """Torch-Pruning cannot map a layer's removed indices through the graph: the layer keeps its
    structures (shrink names the reason)."""


class GroupDoesNotSettle(GroupCannotBeMapped):
    """Torch-Pruning's dependency propagation from a layer kept adding coupled items past
    :data:`GROUP_ITEMS_PER_NODE` per graph node (index mappings that never repeat, e.g. rotary
    embeddings' half rotations fed back into a concatenation), or its flatten mappings produced
    and read more than :data:`MAX_MAPPED_INDICES` indices in all."""


#: coupled items a pruning group may hold per graph node before the propagation is stopped
GROUP_ITEMS_PER_NODE = 8
_GROUP_LIMIT = threading.local()
try:
    _Group = _tp.dependency.group.Group
except AttributeError:  # pragma: no cover - 1.5.x keeps it in dependency
    _Group = _tp.dependency.Group
_add_dep = _Group.add_dep


def _bounded_add_dep(self, dep, idxs):
    limit = getattr(_GROUP_LIMIT, "items", None)
    if limit is not None and len(self._group) >= limit:
        raise GroupDoesNotSettle(f"Torch-Pruning's dependency propagation from {_GROUP_LIMIT.root} did not settle "
                                 f"after {limit} coupled items ({GROUP_ITEMS_PER_NODE} per graph node)")
    return _add_dep(self, dep, idxs)


_Group.add_dep = _bounded_add_dep  # bounded only inside a graph made by new_graph (else limit None)


def _indexed_has_pruning_op(self, dep, idxs) -> bool:
    """Torch-Pruning's ``Group.has_pruning_op`` (is this target, handler and index list in the
    group?), comparing index lists only with the items of the same target and handler: its own
    scan compared every item's list, quadratic in the group (117 s of a Keypoint R-CNN's shrink,
    166,000 calls).  The table follows appends; it is rebuilt when the group got shorter or an
    item was replaced (``__setitem__`` drops it).  Index lists are kept as tuples in a set (one
    lookup instead of a scan: the scan is where torchvision's MaxViT stood in a faulthandler dump
    200 s into its first removal)."""
    table = self.__dict__.get("_bayesprune_ops")
    if table is None or table[0] > len(self._group):
        table = self._bayesprune_ops = [0, {}]
    for item_dep, item_idxs in self._group[table[0]:]:
        table[1].setdefault((item_dep.target, item_dep.handler), set()).add(tuple(item_idxs))
    table[0] = len(self._group)
    return tuple(idxs) in table[1].get((dep.target, dep.handler), ())


_group_setitem = _Group.__setitem__


def _setitem_dropping_table(self, k, v):
    self.__dict__.pop("_bayesprune_ops", None)
    return _group_setitem(self, k, v)


_group_add_and_merge = getattr(_Group, "add_and_merge", None)


def _add_and_merge_dropping_table(self, dep, idxs):
    self.__dict__.pop("_bayesprune_ops", None)  # it may replace an item in place
    return _group_add_and_merge(self, dep, idxs)


_has_pruning_op = getattr(_Group, "has_pruning_op", None)
if callable(_has_pruning_op):
    _Group.has_pruning_op = _indexed_has_pruning_op
    _Group.__setitem__ = _setitem_dropping_table
    if callable(_group_add_and_merge):
        _Group.add_and_merge = _add_and_merge_dropping_table

#: indices the flatten index mappings of one bounded pruning group may produce and read, all
#: together: 2^19, 5x a [N, 2048, 7, 7] -> [N, 100352] flatten of every channel; past it the
#: propagation stops with GroupDoesNotSettle.  Torch-Pruning reads every reshape of a 4-d tensor
#: as a flatten of dim 1, so a channels-last [N, H, W, C] reshaped into windows (torchvision's
#: Swin, MaxViT's window and grid partitions) makes each pruned channel H*W*... indices,
#: multiplied again at the next reshape: millions of Python objects.  Bounding each mapping alone
#: was not enough: a MaxViT group made 78 million index objects in 7,400 mappings each under the
#: bound (~9 s per layer, 2026-12-03).
MAX_MAPPED_INDICES = 1 << 19
_flatten_call = FlattenIndexMapping.__call__


def _bounded_flatten_call(self, idxs):
    if getattr(_GROUP_LIMIT, "items", None) is not None:
        made = len(idxs) if self.reverse else len(idxs) * self._stride
        _GROUP_LIMIT.mapped += made
        if _GROUP_LIMIT.mapped > MAX_MAPPED_INDICES:
            raise GroupDoesNotSettle(f"Torch-Pruning's dependency propagation from {_GROUP_LIMIT.root} mapped "
                                     f"{_GROUP_LIMIT.mapped} indices through flattens (the last: {len(idxs)} indices "
                                     f"x stride {self._stride}{', reversed' if self.reverse else ''}), past "
                                     f"MAX_MAPPED_INDICES = {MAX_MAPPED_INDICES} (reshapes it reads as flattens of "
                                     "channels)")
    return _fast_flatten_call(self, idxs)


_HybridIndex = getattr(getattr(_tp, "_helpers", None), "_HybridIndex", None)


def _fast_flatten_call(self, idxs):
    """Torch-Pruning's flatten mapping (index i -> i*stride ... (i+1)*stride - 1, or back by
    integer division, deduplicated), with its index tuples made by ``tuple.__new__`` instead of
    the namedtuple's keyword constructor: the same list, ~2x faster.  A Swin V2-B spent 44 of its
    70 s of ``prune`` making the 2^19 indices of each group that does not settle (2026-12-04)."""
    stride = getattr(self, "_stride", None)
    if _HybridIndex is None or not isinstance(stride, int) or not idxs or type(idxs[0]) is not _HybridIndex:
        return _flatten_call(self, idxs)
    new, hybrid = tuple.__new__, _HybridIndex
    if self.reverse:
        return list(set([new(hybrid, (i[0] // stride, i[1])) for i in idxs]))
    return [new(hybrid, (k, i[1])) for i in idxs for k in range(i[0] * stride, (i[0] + 1) * stride)]


FlattenIndexMapping.__call__ = _bounded_flatten_call

_SplitIndexMapping = getattr(sys.modules.get("torch_pruning.dependency.index_mapping"), "_SplitIndexMapping",
                             getattr(getattr(_tp, "_helpers", None), "_SplitIndexMapping", None))
if _SplitIndexMapping is not None:
    _split_call = _SplitIndexMapping.__call__

    def _checked_split_call(self, idxs):
        """Torch-Pruning gives a split's i-th reader the i-th part (offsets[i:i + 2]); a part read
        by several nodes gives the later readers no part at all, and the indices were shifted by
        the end offset (reverse) or raised IndexError (forward)."""
        if len(self.offset) < 2:
            root = getattr(_GROUP_LIMIT, "root", None)
            raise GroupCannotBeMapped(f"Torch-Pruning cannot map {'the removal from ' + str(root) if root else 'a removal'} "
                                      f"through a split: one of the split's parts is read by several nodes, more "
                                      f"readers than parts (offsets {list(self.offset)})")
        return _split_call(self, idxs)

    _SplitIndexMapping.__call__ = _checked_split_call


def _shape_key(graph) -> tuple:
    """The shapes of every graph module's own parameters and buffers (what a removal changes)."""
    key = []
    for m in graph.module2node:
        if isinstance(m, torch.Tensor):
            key.append(tuple(m.shape))
        else:
            key.append(tuple(tuple(t.shape) for t in list(m._parameters.values()) + list(m._buffers.values())
                             if t is not None))
    return tuple(key)


_index_mapping = sys.modules.get("torch_pruning.dependency.index_mapping")
if _index_mapping is not None and callable(getattr(_index_mapping, "update_index_mapping", None)):
    _update_index_mapping = _index_mapping.update_index_mapping

    def _update_index_mapping_once(graph):
        """Torch-Pruning recomputes every concat/split/reshape/slice index mapping (recursive shape
        inference) at each ``get_pruning_group``; inside one, that is skipped when no module's
        shape changed since the last such update (a Swin-T spent most of its shrink there)."""
        if not getattr(_GROUP_LIMIT, "items", None):  # building the graph: always
            return _channels_cached(graph, _update_index_mapping)
        key = _shape_key(graph)
        if getattr(graph, "_bayesprune_mapping_key", None) != key:
            _channels_cached(graph, _update_index_mapping)
            graph._bayesprune_mapping_key = key

    def _channels_cached(graph, update):
        """``update(graph)`` with the graph's channel counts (``get_out_channels`` /
        ``get_in_channels`` of a node or module) computed once each: no module changes during an
        update, and its recursive shape inference asks for the same counts many times (1.7
        million calls, 80 % of a Swin-T's update time).  The pruners' ``pruning_dim``, which these
        calls set, is set again by every dependency before it prunes."""
        outs, ins = {}, {}
        get_out, get_in = graph.get_out_channels, graph.get_in_channels

        def out_channels(x):
            k = id(x)
            if k not in outs:
                outs[k] = (x, get_out(x))  # x held: its id stays its own during the update
            return outs[k][1]

        def in_channels(x):
            k = id(x)
            if k not in ins:
                ins[k] = (x, get_in(x))
            return ins[k][1]

        graph.get_out_channels, graph.get_in_channels = out_channels, in_channels
        try:
            return update(graph)
        finally:
            del graph.get_out_channels, graph.get_in_channels  # the class's methods again

    _index_mapping.update_index_mapping = _update_index_mapping_once

if _index_mapping is not None and callable(getattr(_index_mapping, "update_reshape_index_mapping", None)):
    _update_reshape_index_mapping = _index_mapping.update_reshape_index_mapping

    def _reshape_mapping_or_none(graph, reshape_node):
        """Torch-Pruning's reshape index mapping, left out (as it does for a width it cannot
        infer) where an inferred width is 0 (its shape inference gives 0 for a path back to the
        model's input): it divided by it, and the ZeroDivisionError stopped the whole update, so
        no removal was possible (torchvision's ShuffleNetV2, whose channel shuffles are views)."""
        try:
            return _update_reshape_index_mapping(graph, reshape_node)
        except ZeroDivisionError:
            return None

    _index_mapping.update_reshape_index_mapping = _reshape_mapping_or_none  # update_index_mapping looks it up here

if (_index_mapping is not None and _shape_infer is not None
        and callable(getattr(_index_mapping, "update_concat_index_mapping", None))
        and callable(getattr(_shape_infer, "infer_channels_between", None))):
    _update_concat_index_mapping = _index_mapping.update_concat_index_mapping

    def _concat_mapping_or_none(graph, cat_node):
        """Torch-Pruning's concat index mapping, left out (as it does itself for an input of
        unknown width, a few lines later) when an input's width is unknown: it sums the widths
        first, and an unknown one (None: a split part read by more nodes than the split has
        parts) raised TypeError while building the graph."""
        if cat_node.type == OPTYPE.CONCAT and hasattr(cat_node.module, "concat_sizes"):
            chs = cat_node.module.concat_sizes
            if chs is None:
                chs = [_shape_infer.infer_channels_between(graph, n, cat_node) for n in cat_node.inputs]
                cat_node.module.concat_sizes = chs  # what Torch-Pruning stores before its own return
            if any(ch is None for ch in chs):
                return None
        return _update_concat_index_mapping(graph, cat_node)

    _index_mapping.update_concat_index_mapping = _concat_mapping_or_none


def _bounded_groups(graph) -> None:
    get = graph.get_pruning_group

    def get_pruning_group(module, pruning_fn, idxs):
        _GROUP_LIMIT.items, _GROUP_LIMIT.root = (GROUP_ITEMS_PER_NODE * max(1, len(graph.module2node)),
                                                     getattr(graph, '_module2name', {}).get(module, type(module).__name__))
        _GROUP_LIMIT.mapped = 0
        collecting = gc.isenabled()
        gc.disable()  # a group makes up to MAX_MAPPED_INDICES index tuples, and no reference cycles
        try:
            return get(module, pruning_fn, idxs)
        finally:
            _GROUP_LIMIT.items = _GROUP_LIMIT.root = None
            if collecting:
                gc.enable()

    graph.get_pruning_group = get_pruning_group


def new_graph():
    """A ``DependencyGraph`` whose convolutions (not depthwise) are pruned by :data:`CONV_PRUNER`,
    and whose pruning groups raise :class:`GroupCannotBeMapped` where Torch-Pruning's index
    mapping would go wrong (a split part read by several nodes) or past a size bound
    (:class:`GroupDoesNotSettle`: :data:`GROUP_ITEMS_PER_NODE`, :data:`MAX_MAPPED_INDICES`)."""
    graph = DependencyGraph()
    _bounded_groups(graph)
    registered = getattr(graph, "REGISTERED_PRUNERS", None)
    if not isinstance(registered, dict) or OPTYPE.CONV not in registered:  # pragma: no cover
        raise _missing("DependencyGraph.REGISTERED_PRUNERS (per-graph pruner table)")
    registered[OPTYPE.CONV] = CONV_PRUNER
    for attr, side in (("_in_channel_pruning_fn", "prune_in_channels"), ("_out_channel_pruning_fn", "prune_out_channels")):
        fns = getattr(graph, attr, None)
        if isinstance(fns, set):  # (else built from REGISTERED_PRUNERS later, in build_dependency)
            fns.add(getattr(CONV_PRUNER, side))
    return graph


def rebind_parameters(graph, real_of: dict) -> None:
    """Point ``graph`` at the real parameters after a trace on stand-ins (``real_of``: id of the
    stand-in -> the real parameter): the unwrapped parameters Torch-Pruning prunes as nodes of
    their own (a ViT's class token) are keyed by object in ``module2node``, ``_param_to_name``,
    ``_module2name`` and ``unwrapped_parameters`` (1.5.0 to 1.6.1)."""
    for table in (graph.module2node, getattr(graph, "_param_to_name", {}), getattr(graph, "_module2name", {})):
        for key in [k for k in table if id(k) in real_of]:
            table[real_of[id(key)]] = table.pop(key)
    for node in graph.module2node.values():
        if id(node.module) in real_of:
            node.module = real_of[id(node.module)]
    unwrapped = getattr(graph, "unwrapped_parameters", None)
    if unwrapped:
        graph.unwrapped_parameters = [type(u)(real_of.get(id(u[0]), u[0]), *u[1:]) for u in unwrapped]


def finish_grouped_convs(model) -> None:
    """Raise if a grouped convolution of ``model`` was left between two valid states by a removal."""
    for name, mod in model.named_modules():
        st = getattr(mod, _STATE, None)
        if st is not None:
            delattr(mod, _STATE)
            rows = {g: st["rows"].count(g) for g in sorted(set(st["rows"]))}
            ins = {g: st["ins"].count(g) for g in sorted(set(st["ins"]))}
            raise ValueError(
                f"grouped convolution {name or type(mod).__name__}: the removal left unequal groups "
                f"(rows per original group {rows}, inputs per original group {ins})"
            )
