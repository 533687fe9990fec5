"""Layer selection (bayesprune.selection): prediction heads get no noise, recurrent layers are
named, Hugging Face Conv1D is a Linear, and the Bayes-factor masks choose from the same place."""

import pytest
import torch
from torch import nn

import bayesprune as bp
from bayesprune import selection
from bayesprune.bayes_factor import prunable_weights
from bayesprune.removal import carry_optimizer_state

TOL = 1e-5


def _rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


class TwoHeads(nn.Module):
    """A detector in miniature: a trunk, a proposal head whose output reaches the model output only
    through a detached, index-selected path, and class / box heads on pooled features."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())
        self.objectness = nn.Conv2d(8, 1, 1)
        self.fc = nn.Linear(8, 16)
        self.cls = nn.Linear(16, 5)
        self.box = nn.Linear(16, 4)

    def forward(self, x):
        f = self.trunk(x)
        score = self.objectness(f).detach().flatten(1)
        keep = score.topk(3, dim=1).indices  # which positions are "proposals"
        feats = f.flatten(2).gather(2, keep.unsqueeze(1).expand(-1, f.shape[1], -1)).mean(2)
        h = torch.relu(self.fc(feats))
        return {"scores": self.cls(h), "boxes": self.box(h), "kept": keep}


def test_every_layer_feeding_a_model_output_is_a_head():
    torch.manual_seed(0)
    model, x = TwoHeads(), torch.randn(2, 3, 8, 8)
    traced = selection.trace(model, x)
    assert traced.heads == ["objectness", "cls", "box"]  # the detached proposal path counts too
    bp.add_noise(model, x)
    assert [n.layer_name for n in bp.noise_layers(model)] == ["trunk.0", "trunk.2", "fc"]
    bp.remove_noise(model)
    bp.add_noise(model, x, exclude_output_layer=False)
    assert [n.layer_name for n in bp.noise_layers(model)] == ["trunk.0", "trunk.2", "objectness", "fc", "cls", "box"]


def test_classifier_head_and_residual_trunk():
    torchvision = pytest.importorskip("torchvision")
    model, x = torchvision.models.resnet18(num_classes=3), torch.randn(1, 3, 32, 32)
    assert selection.trace(model, x).heads == ["fc"]
    bp.add_noise(model, x)
    names = [n.layer_name for n in bp.noise_layers(model)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    assert names == convs  # every conv (as the old "all but the last layer run"), not fc


def test_torchvision_detector_and_segmentation_heads_get_no_noise():
    """Faster R-CNN's RPN objectness / box deltas and its box predictor, and FCN's / DeepLabV3's
    final 1x1 conv, are the layers a model output is computed from (random weights, no download)."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    det = tv.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None,
                                                                min_size=128, max_size=128).eval()
    heads = ["rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box_predictor.cls_score",
             "roi_heads.box_predictor.bbox_pred"]
    traced = selection.trace(det, ([torch.rand(3, 128, 128)],))
    assert traced.heads == heads
    chosen = selection.select_noise_layers(det, traced)
    assert not set(heads) & set(chosen)
    # the layers before them are hidden layers and get noise: RPN's 3x3 conv, the box head's MLP
    assert {"rpn.head.conv.0.0", "roi_heads.box_head.fc6", "roi_heads.box_head.fc7"} <= set(chosen)
    ran = [n for n, m in det.named_modules() if selection.is_prunable(m) and any(c.name == n for c in traced.calls)]
    assert sorted(chosen) == sorted(n for n in ran if n not in heads)
    for build in (tv.models.segmentation.fcn_resnet50, tv.models.segmentation.deeplabv3_mobilenet_v3_large):
        seg = build(weights=None, weights_backbone=None, num_classes=3).eval()
        traced = selection.trace(seg, torch.randn(1, 3, 32, 32))
        assert traced.heads == ["classifier.4"]
        assert "classifier.4" not in selection.select_noise_layers(seg, traced)


class RecurrentNet(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.inp, self.rnn = nn.Linear(6, 12), rnn
        self.mid, self.out = nn.Linear(12, 12), nn.Linear(12, 3)

    def forward(self, x):
        h, _ = self.rnn(torch.relu(self.inp(x)))
        return self.out(torch.relu(self.mid(h[:, -1])))


@pytest.mark.parametrize("kind", ["gru", "lstm", "rnn"])
def test_recurrent_model_prunes_and_shrinks_the_layers_it_can(kind):
    torch.manual_seed(0)
    rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[kind](12, 12, batch_first=True)
    model, x = RecurrentNet(rnn), torch.randn(2, 5, 6)
    bp.add_noise(model, x)
    assert [n.layer_name for n in bp.noise_layers(model)] == ["mid"]  # inp feeds the recurrent layer
    with pytest.raises(ValueError, match=r"'inp' feeds the recurrent layer\(s\) 'rnn'"):
        bp.remove_noise(model)
        bp.add_noise(model, x, layers=["inp", "mid"])
    bp.add_noise(model, x)
    model.eval()
    with torch.no_grad():
        bp.noise_layers(model)[0].mask[[0, 3, 4, 9]] = 0
    rep = bp.prune(model, "etheta", threshold=-1.0)  # keeps the mask, counts the shrunk network
    small = bp.shrink(model)
    assert small.mid.out_features == 8 and small.out.in_features == 8
    assert rep.params_kept == bp.count_parameters(small) == bp.count_parameters(model) - 4 * (12 + 1) - 4 * 3
    with torch.no_grad():
        other = torch.randn(3, 7, 6)
        assert _rel_err(model(other), small(other)) <= TOL


def test_lstm_with_only_an_output_layer_says_why():
    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.fc = nn.LSTM(6, 12, batch_first=True), nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0])

    with pytest.raises(ValueError) as e:
        bp.add_noise(Tagger(), torch.randn(2, 5, 6))
    msg = str(e.value)
    assert "'lstm': LSTM" in msg and "not prunable structures" in msg
    assert "'fc' is a prediction head" in msg and "exclude_output_layer=False" in msg


class _Conv1DLike(nn.Module):
    """Hugging Face's Conv1D layout (weight [in, out]), without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


_Conv1DLike.__name__ = "Conv1D"


def _mlp(linear):
    return nn.Sequential(linear(16, 8), nn.Tanh(), linear(16, 16), nn.GELU(), linear(10, 16), nn.ReLU(), nn.Linear(10, 4))


def test_transposed_linear_prunes_like_the_linear_it_is():
    """The same network with Conv1D layers and with nn.Linear layers (weights transposed): the same
    structures removed, the same parameter count, the same outputs."""
    torch.manual_seed(0)
    conv1d = _mlp(lambda nf, nx: _Conv1DLike(nf, nx))
    linear = _mlp(lambda nf, nx: nn.Linear(nx, nf))
    with torch.no_grad():
        for a, b in zip(conv1d, linear):
            if isinstance(a, _Conv1DLike):
                b.weight.copy_(a.weight.T)
                b.bias.copy_(a.bias)
        linear[-1].load_state_dict(conv1d[-1].state_dict())
    x = torch.randn(4, 3, 8)  # token sequences: one structure per feature
    assert selection.is_transposed_linear(conv1d[0]) and not selection.is_transposed_linear(linear[0])
    small = {}
    for key, model in (("conv1d", conv1d), ("linear", linear)):
        bp.add_noise(model, x)
        assert [(n.layer_name, n.num_structures, n.dim) for n in bp.noise_layers(model)] == [("0", 16, -1), ("2", 16, -1), ("4", 10, -1)]
        model.eval()
        with torch.no_grad():
            for n, idx in zip(bp.noise_layers(model), ([1, 2, 7], [0, 5], [3, 4, 8, 9])):
                n.mu.fill_(-0.3)
                n.mask[idx] = 0
        rep = bp.prune(model, "etheta", threshold=-1.0)
        small[key] = bp.shrink(model)
        assert rep.params_kept == bp.count_parameters(small[key])
        with torch.no_grad():
            assert _rel_err(model(x), small[key](x)) <= TOL
            assert _rel_err(model(x + 1), small[key](x + 1)) <= TOL
    assert bp.count_parameters(small["conv1d"]) == bp.count_parameters(small["linear"])
    assert [small["conv1d"][i].nf for i in (0, 2, 4)] == [small["linear"][i].out_features for i in (0, 2, 4)] == [13, 14, 6]
    with torch.no_grad():
        assert _rel_err(small["linear"](x), small["conv1d"](x)) <= TOL


def test_transposed_linear_shrink_for_training_carries_its_noise_and_state():
    torch.manual_seed(0)
    model = _mlp(lambda nf, nx: _Conv1DLike(nf, nx))
    x = torch.randn(4, 3, 8)
    bp.add_noise(model, x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        bp.noise_layers(model)[1].mask[[0, 5]] = 0
    small = bp.shrink_for_training(model)
    assert small[2].nf == 14 and small[4].nx == 14
    new = torch.optim.Adam(small.parameters(), lr=1e-3)
    carry_optimizer_state(model, opt, small, new)
    keep = [i for i in range(16) if i not in (0, 5)]
    assert torch.equal(new.state[small[2].weight]["exp_avg"], opt.state[model[2].weight]["exp_avg"][:, keep])
    assert torch.equal(small[2].bayes_noise.mu, model[2].bayes_noise.mu[keep])
    model.eval(), small.eval()
    with torch.no_grad():
        assert _rel_err(model(x), small(x)) <= TOL


def test_gpt2_conv1d_gets_noise_and_shrinks():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.GPT2Model(tf.GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=16,
                                       bos_token_id=0, eos_token_id=0, use_cache=False))
    ids = torch.randint(0, 50, (2, 8))
    bp.add_noise(model, ids)
    # c_proj outputs join the residual stream, which is the model's output: heads, no noise
    assert [n.layer_name for n in bp.noise_layers(model)] == ["h.0.attn.c_attn", "h.0.mlp.c_fc"]
    model.eval()
    with torch.no_grad():
        bp.noise_layers(model)[1].mask[torch.arange(0, 128, 3)] = 0
    rep = bp.prune(model, "etheta", threshold=-1.0)
    small = bp.shrink(model)
    assert small.h[0].mlp.c_fc.nf == 128 - 43 and small.h[0].mlp.c_proj.nx == 128 - 43
    assert rep.params_kept == bp.count_parameters(small) == bp.count_parameters(model) - 43 * (32 + 1 + 32)
    other = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        assert _rel_err(model(other).last_hidden_state, small(other).last_hidden_state) <= TOL


def test_t5_output_with_a_cache_object_shrinks():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tf.T5Model(tf.T5Config(vocab_size=50, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4))
    x = {"input_ids": torch.randint(0, 50, (2, 6)), "decoder_input_ids": torch.randint(0, 50, (2, 5))}
    model.eval()
    assert model(**x).past_key_values is not None  # the output holds a Cache object
    ff = ["encoder.block.0.layer.1.DenseReluDense.wi", "decoder.block.0.layer.2.DenseReluDense.wi"]
    bp.add_noise(model, x, layers=ff)
    model.eval()  # the noise modules too
    with torch.no_grad():
        for n in bp.noise_layers(model):
            n.mask[:20] = 0
    rep = bp.prune(model, "etheta", threshold=-1.0)
    small = bp.shrink(model)
    assert [small.get_submodule(n).out_features for n in ff] == [44, 44]
    assert rep.params_kept == bp.count_parameters(small) == bp.count_parameters(model) - 2 * 20 * (32 + 32)
    with torch.no_grad():
        assert _rel_err(model(**x).last_hidden_state, small(**x).last_hidden_state) <= TOL


def test_bayes_factor_weights_and_noise_choose_from_one_place():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 8), nn.ReLU(), nn.Linear(8, 2))
    assert list(prunable_weights(model)) == selection.prunable_weight_layers(model) == ["0", "3", "5"]
    for call in (lambda: prunable_weights(model, ["1"]), lambda: bp.add_noise(model, torch.randn(1, 3, 8, 8), layers=["1"])):
        with pytest.raises(ValueError, match="layer '1' is a ReLU; prunable layers are"):
            call()
    with pytest.raises(ValueError, match="no module named 'nope'"):
        prunable_weights(model, ["nope"])
