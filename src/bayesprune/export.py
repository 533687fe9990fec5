"""Save, load and export shrunk models (issue 4).

File format (``save_shrunk``): one ``torch.save`` file holding only tensors and strings, so
:func:`load_shrunk` reads it with ``torch.load(weights_only=True)`` (no arbitrary unpickling)::

    {"format": "bayesprune-shrunk/1",
     "spec": JSON string: {"name", "in_channels", "image_size", "num_classes", "kwargs"}
             (the arguments of bayesprune.models.build_model),
     "pruning": JSON string: {"inputs": [{"shape", "dtype"}, ...], "steps": [[layer, true, [idx, ...]], ...]},
     "state_dict": the shrunk model's state dict}

Loading rebuilds the original architecture (``build_model(**spec)``, or a fresh model you pass
for architectures outside ``build_model``), replays the recorded Torch-Pruning steps on it with
zero example inputs of the recorded shapes, and loads the state dict strictly.

``export_onnx`` writes ONNX with the TorchScript exporter (``dynamo=False``: it needs no
``onnxscript``) with a dynamic batch axis and, with ``check=True``, compares onnxruntime's
output to PyTorch's.
"""

from __future__ import annotations

import json
import os
import warnings

import torch
from torch import nn

from .models import build_model
from .noise import noise_layers
from .removal import _run, _tensors, example_from_spec, replay_pruning

__all__ = ["save_shrunk", "load_shrunk", "export_onnx", "FORMAT"]

FORMAT = "bayesprune-shrunk/1"
_NN_PREFIX = "torch.nn."


def _encode_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, type) and issubclass(v, nn.Module) and getattr(nn, v.__name__, None) is v:
            v = _NN_PREFIX + v.__name__  # e.g. MLP(activation=nn.Tanh)
        elif isinstance(v, tuple):
            v = list(v)
        out[k] = v
    return out


def _decode_kwargs(kwargs: dict) -> dict:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, str) and v.startswith(_NN_PREFIX):
            v = getattr(nn, v[len(_NN_PREFIX):])
        out[k] = v
    return out


def save_shrunk(model: nn.Module, path: str | os.PathLike, spec: dict | None) -> None:
    """Save a model returned by :func:`bayesprune.shrink` to ``path``.

    ``spec``: the original architecture as ``build_model`` arguments, e.g.
    ``{"name": "lenet5", "in_channels": 1, "image_size": 32, "num_classes": 10, "kwargs": {}}``;
    ``None`` for a custom architecture (then pass a fresh original model to :func:`load_shrunk`).
    """
    pruning = getattr(model, "bayesprune_pruning", None)
    if pruning is None:
        raise ValueError("model has no removal record: save the output of bayesprune.shrink(model, ...)")
    if noise_layers(model):
        raise ValueError("model still has noise layers; save the output of bayesprune.shrink, not shrink_for_training")
    spec_json = "null"
    if spec is not None:
        spec = dict(spec)
        missing = {"name", "in_channels", "image_size", "num_classes"} - set(spec)
        if missing:
            raise ValueError(f"spec lacks {', '.join(sorted(missing))} (the arguments of build_model)")
        spec["kwargs"] = _encode_kwargs(spec.get("kwargs") or {})
        spec_json = json.dumps(spec)  # fails loudly on values JSON cannot hold
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {"format": FORMAT, "spec": spec_json, "pruning": json.dumps(pruning), "state_dict": state},
        os.fspath(path),
    )


def load_shrunk(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a file written by :func:`save_shrunk` (``torch.load(weights_only=True)``).

    ``model``: a fresh instance of the original (unpruned, noise-free) architecture; needed when
    the file was saved with ``spec=None``, otherwise built from the spec.  Returns it in eval mode.
    """
    payload = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a {FORMAT} file")
    spec, pruning = json.loads(payload["spec"]), json.loads(payload["pruning"])
    if model is None:
        if spec is None:
            raise ValueError("this file has no architecture spec: pass model=<fresh original architecture>")
        model = build_model(spec["name"], spec["in_channels"], spec["image_size"], spec["num_classes"],
                            **_decode_kwargs(spec.get("kwargs") or {}))
    model.eval()
    replay_pruning(model, example_from_spec(pruning), pruning["steps"])
    model.load_state_dict(payload["state_dict"], strict=True)
    model.bayesprune_pruning = pruning
    return model


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, check: bool = True,
                opset_version: int = 17, rtol: float = 1e-4) -> dict:
    """Export ``model`` (eval mode) to ONNX at ``path``; batch dimension dynamic.

    With ``check`` the ONNX model is run with onnxruntime on ``example_inputs`` and must match
    PyTorch within ``rtol`` times the output scale (else ``AssertionError``).
    Returns ``{"path", "max_abs_diff", "output_scale"}`` (diffs ``None`` without check).
    """
    if noise_layers(model):
        raise ValueError("model has noise layers; export the output of bayesprune.shrink")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if isinstance(example_inputs, dict):
        raise TypeError("export_onnx takes positional example inputs (a tensor or a tuple of tensors)")
    names = [f"input{i}" if len(args) > 1 else "input" for i in range(len(args))]
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = [t.detach() for t in _tensors(_run(model, args))]
        out_names = [f"output{i}" if len(reference) > 1 else "output" for i in range(len(reference))]
        axes = {n: {0: "batch"} for n in names + out_names}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, args, os.fspath(path), dynamo=False, input_names=names,
                              output_names=out_names, dynamic_axes=axes, opset_version=opset_version)
    finally:
        model.train(was)
    result = {"path": os.fspath(path), "max_abs_diff": None, "output_scale": None}
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {n: a.detach().cpu().numpy() for n, a in zip(names, args)})
        diff = max(float((torch.from_numpy(o) - r.cpu()).abs().max()) for o, r in zip(outs, reference))
        scale = max(float(r.abs().max()) for r in reference)
        result.update(max_abs_diff=diff, output_scale=scale)
        if not diff <= rtol * max(scale, 1e-12):
            raise AssertionError(f"ONNX output differs from PyTorch: max abs diff {diff:.3g} at scale {scale:.3g}")
    return result
