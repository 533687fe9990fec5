"""Save, load and export shrunk models (docs/shrink.md, "Saving and loading").

File format (``save_shrunk``): one ``torch.save`` file holding only tensors and strings, so
:func:`load_shrunk` reads it with ``torch.load(weights_only=True)`` (no arbitrary unpickling)::

    {"format": "bayesprune-shrunk/1",
     "spec": JSON string: any JSON description of the original architecture, or null,
     "pruning": JSON string: {"inputs": [{"shape", "dtype"}, ...], "steps": [[layer, true, [idx, ...]], ...]},
     "state_dict": the shrunk model's state dict}

Loading takes a fresh instance of the original architecture (``model=``) or a ``builder`` that
makes one from the stored spec (the experiment harness's is
``bayesprune.experiments.models.build_from_spec``), replays the recorded Torch-Pruning steps on
it with zero example inputs of the recorded shapes, and loads the state dict strictly.

``export_onnx(shrunk, path)`` writes ONNX with the TorchScript exporter (``dynamo=False``: it
needs no ``onnxscript``) with a dynamic batch axis and, with ``check=True``, compares
onnxruntime's output to PyTorch's; without ``example_inputs`` it uses a random input of the
shape recorded by :func:`bayesprune.shrink` (the shape of the input given to ``add_noise``).
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from .heads import replay_heads
from .noise import noise_layers
from .removal import _probe, _run, _tensors, example_from_spec, replay_pruning

__all__ = ["save_shrunk", "load_shrunk", "export_onnx", "OnnxExport", "FORMAT"]

FORMAT = "bayesprune-shrunk/1"


def save_shrunk(model: nn.Module, path: str | os.PathLike, spec: dict | None = None) -> None:
    """Save a model returned by :func:`bayesprune.shrink` to ``path``.

    ``spec``: a JSON-serialisable description of the original architecture, handed back to the
    ``builder`` of :func:`load_shrunk`; ``None`` to load with a fresh original model instead.
    """
    pruning = getattr(model, "bayesprune_pruning", None)
    if pruning is None:
        raise ValueError("model has no removal record: save the output of bayesprune.shrink(model, ...)")
    if noise_layers(model):
        raise ValueError("model still has noise layers; save the output of bayesprune.shrink, not shrink_for_training")
    try:
        spec_json = json.dumps(spec)
    except (TypeError, ValueError) as e:
        raise ValueError(f"spec must be JSON-serialisable: {e}") from None
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save(
        {"format": FORMAT, "spec": spec_json, "pruning": json.dumps(pruning), "state_dict": state},
        os.fspath(path),
    )


def load_shrunk(path: str | os.PathLike, model: nn.Module | None = None, *,
                builder: Callable[[Any], nn.Module] | None = None) -> nn.Module:
    """Load a file written by :func:`save_shrunk` (``torch.load(weights_only=True)``).

    ``model``: a fresh instance of the original (unpruned, noise-free) architecture; or
    ``builder``: a function that makes one from the spec stored in the file.  Returns the model
    in eval mode.
    """
    name = os.fspath(path)
    try:
        payload = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors, truncated zip archives, foreign pickles
        raise ValueError(f"{name!r} is not a readable {FORMAT} file: {type(e).__name__}: {e}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{name!r} is not a {FORMAT} file")
    try:
        spec, pruning, state = json.loads(payload["spec"]), json.loads(payload["pruning"]), payload["state_dict"]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{name!r} is a damaged {FORMAT} file ({type(e).__name__}: {e})") from None
    if model is None:
        if builder is None or spec is None:
            raise ValueError(f"{name!r}: pass model=<fresh original architecture>"
                             + ("" if spec is None else " or builder=<function of the stored spec>"))
        model = builder(spec)
    model.eval()
    replay_heads(model, pruning.get("heads"))  # attention heads were removed before the other structures
    replay_pruning(model, example_from_spec(pruning), pruning["steps"])
    model.load_state_dict(state, strict=True)
    model.bayesprune_pruning = pruning
    return model


@dataclass
class OnnxExport:
    """Where :func:`export_onnx` wrote the model, and its check (``None`` without ``check``)."""

    path: str
    max_abs_diff: float | None = None
    output_scale: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs=None, *, check: bool = True,
                opset_version: int = 17, rtol: float = 1e-4) -> OnnxExport:
    """Export ``model`` (eval mode; the output of :func:`bayesprune.shrink`) to ONNX at ``path``,
    batch dimension dynamic.

    ``example_inputs``: the input traced and checked; by default a random one of the shape the
    shrunk model records (the input given to ``add_noise``).  With ``check`` the ONNX model is run
    with onnxruntime on it and must match PyTorch within ``rtol`` times the output scale (else
    ``AssertionError``).
    """
    if noise_layers(model):
        raise ValueError("model has noise layers; export the output of bayesprune.shrink")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"export_onnx(model, path, example_inputs=None): path must be a file name, got {type(path).__name__}")
    if example_inputs is None:
        spec = getattr(model, "bayesprune_pruning", None)
        if spec is None:
            raise ValueError("model records no input shape (it is not the output of bayesprune.shrink): pass example_inputs")
        example_inputs = _probe(example_from_spec(spec))
    if isinstance(example_inputs, dict):
        raise TypeError("export_onnx takes positional example inputs (a tensor or a tuple of tensors)")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    p = next(iter(model.parameters()), None)
    if p is not None:
        args = tuple(a.to(p.device) if torch.is_tensor(a) else a for a in args)
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
    result = OnnxExport(os.fspath(path))
    if check:
        import onnxruntime as ort

        sess = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {n: a.detach().cpu().numpy() for n, a in zip(names, args)})
        diff = max(float((torch.from_numpy(o) - r.cpu()).abs().max()) for o, r in zip(outs, reference))
        scale = max(float(r.abs().max()) for r in reference)
        result.max_abs_diff, result.output_scale = diff, scale
        if not diff <= rtol * max(scale, 1e-12):
            raise AssertionError(f"ONNX output differs from PyTorch: max abs diff {diff:.3g} at scale {scale:.3g}")
    return result
