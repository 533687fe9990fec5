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
group item's ``dep``, ``idxs`` and ``root_idxs`` (present in 1.5.0 to 1.6.1).
"""

from __future__ import annotations

import re
from importlib import metadata

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
    "TransposedLinearPruner",
    "TRANSPOSED_LINEAR_PRUNER",
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
    prune_conv_out_channels = _tp.prune_conv_out_channels
    count_ops_and_params = _tp.utils.count_ops_and_params
    OPTYPE = _ops.OPTYPE
    _BasePruningFunc = _tp.pruner.function.BasePruningFunc
except AttributeError as e:  # pragma: no cover - depends on the installed version
    raise _missing(str(e)) from e

for _name in ("ELEMENTWISE", "RESHAPE", "CONCAT", "SPLIT", "EXPAND", "SLICE", "UNBIND"):
    if not hasattr(OPTYPE, _name):  # pragma: no cover
        raise _missing(f"torch_pruning.ops.OPTYPE.{_name}")
for _name in ("build_dependency", "get_pruning_group", "is_out_channel_pruning_fn", "load_pruning_history"):
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
