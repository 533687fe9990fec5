"""Saving, loading and ONNX export of shrunk models; the size/speed report."""

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune.experiments.models import architecture_spec, build_from_spec, build_model


def _shrunk(name, x, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = build_model(name, x.shape[1], x.shape[-1], 10, **kwargs)
    bp.add_noise(model, x[:1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            n.mu.copy_(torch.randn(n.mu.shape, generator=g))
            n.mask.copy_((torch.rand(n.mask.shape, generator=g) > 0.4).float())
    return model, bp.shrink(model).eval()  # the input given to add_noise


@pytest.mark.parametrize(
    "name, kwargs",
    [("lenet5", {}), ("mlp", {"width": 16, "extra_layers": 1, "activation": nn.Tanh}), ("resnet18-cifar", {})],
)
def test_save_load_roundtrip(tmp_path, name, kwargs):
    x = torch.randn(3, 3 if "resnet" in name else 1, 8, 8)
    _, shrunk = _shrunk(name, x, **kwargs)
    spec = architecture_spec(name, x.shape[1], 8, 10, **kwargs)
    path = tmp_path / "model.pt"
    bp.save_shrunk(shrunk, path, spec)
    payload = torch.load(path, weights_only=True)  # safe format: tensors and strings only
    assert set(payload) == {"format", "spec", "pruning", "state_dict"}
    loaded = bp.load_shrunk(path, builder=build_from_spec)
    assert not loaded.training
    assert bp.count_parameters(loaded) == bp.count_parameters(shrunk)
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk(x))


def test_save_without_spec_needs_model(tmp_path):
    x = torch.randn(2, 1, 8, 8)
    _, shrunk = _shrunk("lenet5", x)
    path = tmp_path / "m.pt"
    bp.save_shrunk(shrunk, path, None)
    with pytest.raises(ValueError, match="model="):
        bp.load_shrunk(path)
    loaded = bp.load_shrunk(path, model=build_model("lenet5", 1, 8, 10))
    with torch.no_grad():
        assert torch.equal(loaded(x), shrunk(x))


def test_save_rejects_models_that_are_not_shrunk(tmp_path):
    x = torch.randn(1, 1, 8, 8)
    model, _ = _shrunk("lenet5", x)
    with pytest.raises(ValueError):
        bp.save_shrunk(model, tmp_path / "m.pt", None)
    with pytest.raises(ValueError, match="JSON"):
        bp.save_shrunk(bp.shrink(model, x), tmp_path / "m.pt", {"activation": nn.Tanh})
    bp.save_shrunk(bp.shrink(model, x), tmp_path / "m.pt", {"name": "lenet5"})
    with pytest.raises(ValueError, match="spec lacks"):
        bp.load_shrunk(tmp_path / "m.pt", builder=build_from_spec)
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt"):
        bp.load_shrunk(tmp_path / "garbage.pt", builder=build_from_spec)


@pytest.mark.parametrize("name", ["lenet5", "resnet18-cifar"])
def test_export_onnx_matches_torch(tmp_path, name):
    pytest.importorskip("onnxruntime")
    x = torch.randn(4, 3 if "resnet" in name else 1, 8, 8)
    model, shrunk = _shrunk(name, x)
    result = bp.export_onnx(shrunk, tmp_path / "m.onnx", x)
    assert isinstance(result, bp.OnnxExport) and result.path == str(tmp_path / "m.onnx")
    assert result.max_abs_diff <= 1e-4 * result.output_scale
    # without an input: a random one of the shape recorded by shrink (that of add_noise's input)
    default = bp.export_onnx(shrunk, tmp_path / "m2.onnx")
    assert default.max_abs_diff <= 1e-4 * default.output_scale and default.output_scale > 0
    assert bp.export_onnx(shrunk, tmp_path / "m3.onnx", x, check=False).to_dict() == {
        "path": str(tmp_path / "m3.onnx"), "max_abs_diff": None, "output_scale": None}
    with pytest.raises(TypeError, match="path must be a file name"):
        bp.export_onnx(shrunk, x, tmp_path / "m.onnx")  # the old argument order
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x[:1].numpy()})[0]  # dynamic batch axis
    with torch.no_grad():
        ref = model.eval()(x[:1])  # the masked model with noise
    assert float((torch.from_numpy(out) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.latency
def test_size_speed_report():
    x = torch.randn(1, 1, 8, 8)
    model, shrunk = _shrunk("mlp", x, width=64, extra_layers=1)
    rep = bp.size_speed_report(model, shrunk, batch_sizes=(1, 16), min_repeats=3, budget_s=0.05)  # add_noise's input
    assert isinstance(rep, bp.SizeSpeedReport)
    assert rep.params_original == bp.count_parameters(model) > rep.params_shrunk == bp.count_parameters(shrunk)
    # MACs of a Linear stack at batch 1: in x out per layer (biases not counted as MACs)
    widths = [64] + [m.out_features for m in shrunk.modules() if isinstance(m, nn.Linear)]
    assert rep.macs_shrunk == sum(a * b for a, b in zip(widths, widths[1:])) + sum(widths[1:])
    assert rep.macs_ratio > 1 and rep.params_ratio > 1
    assert set(rep.latency) == {1, 16}
    for t in rep.latency.values():
        assert t.original_ms > 0 and t.shrunk_ms > 0 and t.speedup == pytest.approx(t.original_ms / t.shrunk_ms)
    d = rep.to_dict()
    assert d["params"] == {"original": rep.params_original, "shrunk": rep.params_shrunk, "ratio": rep.params_ratio}
    assert d["latency_ms"][16]["speedup"] == rep.latency[16].speedup
    from bayesprune.benchmarking import format_report

    assert "MACs" in format_report(rep) and format_report(rep) == format_report(d)
    # another input (a batch; only its shape per example counts), and the shrunk model's record
    other = bp.size_speed_report(model, shrunk, torch.zeros(5, 1, 8, 8), batch_sizes=(2,), min_repeats=1, budget_s=0.01)
    plain = bp.size_speed_report(bp.remove_noise(model), shrunk, batch_sizes=(2,), min_repeats=1, budget_s=0.01)
    assert (other.macs_original, other.macs_shrunk) == (plain.macs_original, plain.macs_shrunk) == (rep.macs_original, rep.macs_shrunk)
    with pytest.raises(TypeError, match="one input tensor"):
        bp.size_speed_report(model, shrunk, (1, 8, 8))
