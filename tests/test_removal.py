"""Physical removal: shrink / shrink_for_training reproduce the masked model."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesprune as bp
from bayesprune.experiments.models import MLP, LeNet5, cifar_resnet18, torchvision_model

TOL = 1e-5  # max abs difference relative to the output scale


class Block(nn.Module):
    """Pre-norm transformer block with hand-written attention (q/k/v/out) and an MLP."""

    def __init__(self, d=16, heads=4, hidden=32):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.ln1(x)
        q, k, v = (f(y).view(b, t, self.heads, -1).transpose(1, 2) for f in (self.q, self.k, self.v))
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.b1, self.b2, self.head = nn.Linear(8, 16), Block(), Block(), nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.b2(self.b1(self.emb(x))).mean(1))


class TorchEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Linear(8, 32)
        self.enc = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0)  # batch_first=False: no fast path
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(0))


def _randomise_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


def _random_masks(model, p=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            n.mu.copy_(torch.randn(n.mu.shape, generator=g))
            n.mask.copy_((torch.rand(n.mask.shape, generator=g) > p).float())


def _check(model, shrunk, x):
    with torch.no_grad():
        ya, yb = model.eval()(x), shrunk.eval()(x)
    assert ya.shape == yb.shape
    err = float((ya - yb).abs().max() / ya.abs().max())
    assert err <= TOL, err


CASES = {
    "mlp": (lambda: MLP(64, 10, width=20, extra_layers=2), (4, 1, 8, 8), {}),
    "lenet5": (lambda: LeNet5(1, 10, image_size=8), (4, 1, 8, 8), {}),
    "lenet5-channel": (lambda: LeNet5(1, 10, image_size=32), (4, 1, 32, 32), {"sharing": "channel"}),  # noise after the pools
    "lenet5-structure": (lambda: LeNet5(1, 10, image_size=32), (4, 1, 32, 32), {"sharing": "structure"}),
    "cifar-resnet-channel": (lambda: cifar_resnet18(10), (2, 3, 8, 8), {"sharing": "channel"}),
    "resnet18-cifar": (lambda: cifar_resnet18(10), (2, 3, 8, 8), {}),
    "tv-resnet18": (lambda: torchvision_model("resnet18", 10), (2, 3, 8, 8), {}),
    "transformer-all": (TinyTransformer, (2, 4, 8), {}),  # q/k/v removal breaks heads: fallback
    "transformer-mlp": (TinyTransformer, (2, 4, 8), {"layers": ["b1.fc1", "b2.fc1"]}),
    "torch-encoder": (TorchEncoder, (6, 2, 8), {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_random_masks_equivalence_and_size(name):
    torch.manual_seed(0)
    make, shape, kw = CASES[name]
    model = make()
    _randomise_bn(model)
    x = torch.randn(shape)
    bp.add_noise(model, x[:1], **kw)
    _random_masks(model)
    before = copy.deepcopy(model.state_dict())
    shrunk = bp.shrink(model, x[:1])
    assert not bp.noise_layers(shrunk)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()), "input model changed"
    _check(model, shrunk, x)
    assert bp.count_parameters(shrunk) < bp.count_parameters(model)
    if "resnet" in name:
        return  # shrink_for_training and remaining_parameters share the core; covered on small nets
    assert bp.count_parameters(shrunk) == bp.remaining_parameters(model, x[:1])

    trainable = bp.removal.shrink_for_training(model, x[:1])
    _check(model, trainable, x)
    assert bp.count_parameters(trainable) == bp.count_parameters(shrunk)
    for old, new in zip(bp.noise_layers(model), bp.noise_layers(trainable)):
        layer = trainable.get_submodule(new.layer_name)
        n_out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        assert new.mu.shape == new.log_sigma.shape == new.mask.shape == (n_out,)
        assert int(new.mask.sum()) == int(old.mask.sum())  # every kept structure keeps its noise entry


def test_mlp_parameter_count_by_hand():
    model = MLP(64, 10, width=20, extra_layers=2)
    x = torch.randn(1, 1, 8, 8)
    bp.add_noise(model, x)
    kept = [13, 7, 20]
    for n, k in zip(bp.noise_layers(model), kept):
        n.mask[k:] = 0
    shrunk = bp.shrink(model, x)
    widths = [64] + kept + [10]
    assert bp.count_parameters(shrunk) == sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    _check(model, shrunk, torch.randn(8, 1, 8, 8))


def test_tanh_conv_flatten_linear_folds_into_columns():
    """Noise after a non-homogeneous activation is folded into the next layer through flatten."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 6, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 6 * 6, 4))
    x = torch.randn(3, 1, 8, 8)
    bp.add_noise(model, x[:1])
    _random_masks(model, seed=3)
    shrunk = bp.shrink(model, x[:1])
    kept = int(bp.noise_layers(model)[0].mask.sum())
    assert shrunk[0].out_channels == kept and shrunk[3].in_features == kept * 36
    _check(model, shrunk, x)


def test_residual_coupled_channel_kept_unless_all_masked():
    torch.manual_seed(0)
    model = cifar_resnet18(10)
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    bp.add_noise(model, x[:1])
    noise = {n.layer_name: n for n in bp.noise_layers(model)}
    coupled = ["conv1", "layer1.0.conv2", "layer1.1.conv2"]  # all write the stage-1 residual stream
    noise["conv1"].mask[3] = 0  # only one of the coupled layers: channel stays, zeroed there
    for name in coupled:
        noise[name].mask[7] = 0  # all of them: channel 7 goes
    shrunk = bp.shrink(model, x[:1])
    assert shrunk.conv1.out_channels == 63
    assert shrunk.layer1[0].conv2.out_channels == 63 and shrunk.layer1[1].conv1.in_channels == 63
    assert shrunk.layer2[0].conv1.in_channels == 63 and shrunk.layer2[0].downsample[0].in_channels == 63
    _check(model, shrunk, x)


def test_layernorm_feature_dim_not_removed_but_output_equal():
    torch.manual_seed(0)
    model = TinyTransformer()
    x = torch.randn(2, 4, 8)
    bp.add_noise(model, x[:1], layers=["emb", "b1.o", "b1.fc2", "b2.o", "b2.fc2", "b1.fc1"])
    for n in bp.noise_layers(model):
        n.mask[:5] = 0  # the residual stream's first 5 features masked by every writer
    shrunk = bp.shrink(model, x[:1])
    assert shrunk.emb.out_features == 16  # LayerNorm normalises over them: kept, zeroed
    assert shrunk.b1.fc1.out_features == 27
    _check(model, shrunk, x)


def _train_bmrs(model, x, y, steps=15):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(32, len(x)),))
        loss = F.cross_entropy(model(x[idx]), y[idx]) + bp.kl(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("name", ["mlp", "lenet5", "tv-resnet18", "transformer-mlp"])
def test_masks_from_bmrs_run(name):
    torch.manual_seed(0)
    make, shape, kw = CASES[name]
    model = make()
    x = torch.randn(16 if "resnet" in name else 64, *shape[1:])
    y = torch.randint(0, 10 if name != "transformer-mlp" else 5, (64,))
    bp.add_noise(model, x[:1], **kw)
    _train_bmrs(model, x, y, steps=2 if "resnet" in name else 5)
    with torch.no_grad():  # emulate a longer run: some structures' posteriors collapse to 0
        for i, n in enumerate(bp.noise_layers(model)):
            n.mu[i % 3::3] = -19.0
            n.log_sigma[i % 3::3] = 0.0
    rep = bp.prune(model, "bmrs_n", example_inputs=x[:1])  # the genuine criterion decides
    assert rep.structures_kept < rep.structures_total
    shrunk = bp.shrink(model, x[:1])
    _check(model, shrunk, x[:8])
    assert bp.count_parameters(shrunk) == rep.params_kept < rep.params_total


def test_shrink_for_training_continues_training():
    torch.manual_seed(0)
    model = LeNet5(1, 10, image_size=8)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    bp.add_noise(model, x[:1])
    _random_masks(model)
    small = bp.removal.shrink_for_training(model, x[:1])
    assert small.training == model.training
    opt = torch.optim.Adam(small.parameters(), lr=1e-3)  # new parameters: a new optimizer
    small.train()
    loss = F.cross_entropy(small(x), y) + bp.kl(small)
    loss.backward()
    opt.step()
    assert all(n.mu.grad is not None for n in bp.noise_layers(small))
    rep = bp.prune(small, "bmrs_n", example_inputs=x[:1])  # masks still work after shrinking
    assert rep.structures_total == sum(int(n.mask.sum()) for n in bp.noise_layers(model))


@pytest.mark.parametrize("build", [lambda: LeNet5(1, 10, image_size=16), lambda: cifar_resnet18(10)])
def test_parameter_origins_map_every_shrunk_parameter_to_its_source(build):
    """shrunk_param.flatten() == param.flatten()[origins[name]] for every parameter, noise
    parameters included, on random weights (so equal values mean the right entries); the
    ResNet's coupled residual channels keep some masked structures (zeroed, not removed)."""
    from bayesprune.removal import parameter_origins, shrink_for_training

    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 1, 16, 16) if isinstance(model, LeNet5) else torch.randn(2, 3, 8, 8)
    bp.add_noise(model, x)
    _random_masks(model)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    small = shrink_for_training(model, x)
    origins = parameter_origins(model, small)
    old = dict(model.named_parameters())
    names = [n for n, _ in small.named_parameters()]
    assert set(origins) == set(names)
    assert any(p.numel() < old[n].numel() for n, p in small.named_parameters())
    for name, p in small.named_parameters():
        assert torch.equal(p.detach().flatten(), old[name].detach().flatten()[origins[name]]), name


def _train_eval_mode(model, opt, batches):
    """Adam steps on CE + KL("mean") with the deterministic eval forward (theta = E[theta] mask)."""
    model.eval()
    for x, y in batches:
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + bp.kl(model)).backward()
        opt.step()


@pytest.mark.parametrize("build,shape", [(lambda: MLP(12, 5, width=16, extra_layers=1), (12,)),
                                         (lambda: LeNet5(1, 5, image_size=12), (1, 12, 12))])
def test_training_on_after_shrinking_follows_the_masked_network(build, shape):
    """Shrinking mid-training (shrink_for_training + carry_optimizer_state) changes nothing but
    the size: Adam steps on the shrunk network give the outputs the same steps give on the masked
    one.  Both ingredients are needed, which the test checks too: a fresh Adam state, or a KL mean
    over the remaining structures instead of the initial ones, gives other outputs."""
    from bayesprune.removal import shrink_for_training
    from bayesprune.removal import carry_optimizer_state

    torch.manual_seed(0)
    model = build().double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, *shape, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g))
               for _ in range(8)]
    bp.add_noise(model, batches[0][0][:1])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    _train_eval_mode(model, opt, batches[:3])  # Adam state that matters
    _random_masks(model, p=0.4, seed=3)
    with torch.no_grad():
        for n in bp.noise_layers(model):
            n.mu.clamp_(-1.0, -0.01)  # posteriors inside [a, b]: E[theta] of the kept ones is O(1)

    variants = {}
    for name in ("carried", "fresh", "kl over remaining"):
        masked = copy.deepcopy(model)
        masked_opt = torch.optim.Adam(masked.parameters(), lr=1e-2)
        masked_opt.load_state_dict(opt.state_dict())
        small = shrink_for_training(masked, batches[0][0][:1])
        small_opt = torch.optim.Adam(small.parameters(), lr=1e-2)
        if name != "fresh":
            carry_optimizer_state(masked, masked_opt, small, small_opt)
        if name == "kl over remaining":
            for n in bp.noise_layers(small):
                n.initial_structures = n.num_structures
        _train_eval_mode(masked, masked_opt, batches[3:])
        _train_eval_mode(small, small_opt, batches[3:])
        with torch.no_grad():
            ya, yb = masked(batches[0][0]), small(batches[0][0])
        variants[name] = ((ya - yb).abs().max() / ya.abs().max()).item()
        assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in masked.parameters())
    assert variants["carried"] < 1e-10, variants
    assert variants["fresh"] > 1e-3 and variants["kl over remaining"] > 1e-4, variants


def test_errors():
    with pytest.raises(ValueError, match="no noise layers"):
        bp.shrink(MLP(4, 2, width=3, extra_layers=0), torch.randn(1, 4))
    model = bp.add_noise(MLP(4, 2, width=3, extra_layers=0), torch.randn(1, 4))
    for n in bp.noise_layers(model):
        n.example_inputs = None  # as if no input had been kept
    with pytest.raises(ValueError, match="no example input.*pass example_inputs"):
        bp.shrink(model)
    assert bp.count_parameters(bp.shrink(model, torch.randn(2, 4))) == bp.count_parameters(model)


class TwoInputNet(nn.Module):
    """Two positional inputs; on request its forward raises a ValueError when gradients are on,
    as they are only while the dependency graph is traced."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6 + 3, 2)
        self.fail = False

    def forward(self, x, extra):
        if self.fail and torch.is_grad_enabled():
            raise ValueError("forward refused this input")
        return self.fc2(torch.cat([torch.relu(self.fc1(x)), extra], dim=1))


def test_forward_errors_surface_and_remembered_example_follows_the_model():
    """A forward error during tracing reaches the user as itself (Torch-Pruning's own retry
    would turn it into a misleading "missing argument" TypeError), and the example inputs that
    add_noise remembered are moved to the model's device/dtype holder before tracing."""
    torch.manual_seed(0)
    net = TwoInputNet()
    ex = (torch.randn(3, 4), torch.randn(3, 3))
    bp.add_noise(net, ex)
    bp.noise_layers(net)[0].mask[:2] = 0
    small = bp.shrink(net)  # remembered (x, extra) tuple, unpacked
    net.eval()
    torch.testing.assert_close(small(*ex), net(*ex), atol=1e-6, rtol=0)
    assert small.fc1.out_features == 4 and small.fc2.in_features == 4 + 3
    net.fail = True
    with pytest.raises(RuntimeError, match="ValueError: forward refused this input"):
        bp.shrink(net)


@pytest.mark.parametrize("rows_first", [True, False])
def test_grouped_conv_pruner_keeps_each_group_reading_its_own_inputs(rows_first):
    """bayesprune's conv pruner on a grouped convolution (3 groups of 4 inputs and 3 rows): group 1
    goes whole and groups 0 and 2 lose one input each at different positions and one row each, in
    either order; the pruned conv on the kept inputs equals the original's kept rows on inputs whose
    removed channels are zero (Torch-Pruning's own pruner keeps the first columns of every row)."""
    from bayesprune import _torch_pruning as tpc

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 9, 3, groups=3, padding=1)
    ref = copy.deepcopy(conv)
    drop_in, drop_rows = [4, 5, 6, 7, 1, 10], [3, 4, 5, 0, 8]
    steps = [(tpc.CONV_PRUNER.prune_out_channels, drop_rows), (tpc.CONV_PRUNER.prune_in_channels, drop_in)]
    if not rows_first:
        steps.reverse()
    with torch.no_grad():
        steps[0][0](conv, steps[0][1])
        assert conv.groups == 1  # between two valid states
        with pytest.raises(ValueError, match="left unequal groups"):
            tpc.finish_grouped_convs(copy.deepcopy(conv))
        steps[1][0](conv, steps[1][1])
    tpc.finish_grouped_convs(conv)  # a valid grouped convolution again: nothing raised
    assert (conv.groups, conv.in_channels, conv.out_channels, tuple(conv.weight.shape[:2])) == (2, 6, 4, (4, 3))
    x = torch.randn(2, 12, 5, 5)
    zeroed = x.clone()
    zeroed[:, drop_in] = 0
    keep_in = [c for c in range(12) if c not in drop_in]
    keep_rows = [r for r in range(9) if r not in drop_rows]
    with torch.no_grad():
        torch.testing.assert_close(conv(x[:, keep_in]), ref(zeroed)[:, keep_rows], rtol=1e-6, atol=1e-6)


def _cancelling_mlp():
    """Two hidden neurons of ~1e4 that the output layer nearly cancels (w and 1.001 w, output
    weights +1 and -1): float32 rounds the fold's products at ~1e-5 of the output."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1))
    with torch.no_grad():
        w = torch.randn(16) * 1000
        m[0].weight.copy_(torch.stack([w, w * 1.001, torch.randn(16)]))
        m[0].bias.fill_(5000.0)
        m[2].weight.copy_(torch.tensor([[1.0, -1.0, 0.5]]))
    bp.add_noise(m, torch.rand(4, 16))
    with torch.no_grad():
        noise = bp.noise_layers(m)[0]
        noise.mu.copy_(torch.tensor([-0.3, -0.31, -19.0]))
        noise.log_sigma.fill_(-2.0)
    m.eval()
    bp.prune(m, "etheta")
    return m


def test_fold_missing_the_tolerance_by_float32_rounding_alone_is_accepted_at_that_level(monkeypatch):
    """A fold exact in float64 but 1.03e-5 off in float32 (cancellation) is the network's own
    rounding: shrink checks the removal at twice that difference instead of refusing (a trained
    LeNet5's post-training sweep was refused at 1.1e-5); the strict check alone refuses it."""
    from bayesprune import removal

    m = _cancelling_mlp()
    seen = []
    real = removal._rounding_tolerance
    monkeypatch.setattr(removal, "_rounding_tolerance", lambda *a: seen.append(real(*a)) or seen[-1])
    removal._SHRUNK.clear()  # prune's count shrank (and cached) it already
    small = bp.shrink(m)
    assert len(seen) == 1 and removal.VERIFY_RTOL < seen[0] < 5e-5
    assert small[0].out_features == 2 and not small.bayesprune_kept
    x = torch.rand(6, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = m(x), small(x)
    assert float((ref - out).abs().max() / ref.abs().max()) < 5e-5
    # the same fold and removal in float64 agree to 1e-9: it is rounding, not an inexact fold
    m64, small64 = copy.deepcopy(m).double(), copy.deepcopy(small).double()
    with torch.no_grad():
        ref64 = m64(x.double())
        assert float((ref64 - small64(x.double())).abs().max() / ref64.abs().max()) < 1e-5
    removal._SHRUNK.clear()
    monkeypatch.setattr(removal, "_rounding_tolerance", lambda *a: None)
    with pytest.raises(RuntimeError, match="inexact before any removal"):
        bp.shrink(m)



class _Amplifying(nn.Module):
    """A backbone and a head, then post-processing that turns float rounding into large output
    differences (``frac(1e5 * head)``, as a detector's thresholds, top-k and NMS do near ties)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 3), nn.ReLU())
        self.head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return torch.frac(self.head(self.body(x)) * 1e5)


def _amplifying(exclude_output_layer=True):
    torch.manual_seed(0)
    m = _Amplifying()
    x = torch.randn(2, 3, 10, 10)
    bp.add_noise(m, x, exclude_output_layer=exclude_output_layer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in bp.noise_layers(m):
            n.mu.copy_(-0.5 * torch.rand(n.mu.shape, generator=g))
            n.mu[: n.mu.numel() // 3] = -19.0
        m.body[1].running_mean.normal_(0, 0.5, generator=g)
        m.body[1].running_var.uniform_(0.5, 2.0, generator=g)
    m.eval()
    bp.prune(m, "etheta")
    return m, x


def test_post_processing_that_amplifies_rounding_is_verified_on_the_prediction_heads():
    """The model output differs (frac(1e5 * head) after any float change), but the prediction
    head's output, which no removal touches, equals the masked model's: the removal is exact and
    shrink returns it (a detector's NMS near ties); the head's output is checked, not trusted."""
    from bayesprune import removal

    m, x = _amplifying()
    small = bp.shrink(m)
    assert small.body[0].out_channels < 16
    assert small.body[3].out_channels < 12 and not small.bayesprune_kept
    x2 = torch.randn(3, 3, 10, 10, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for inp in (x, x2):
            ref, out = m.head(m.body(inp)), small.head(small.body(inp))
            assert _rel(ref, out) < 1e-5
            assert _rel(m(inp), small(inp)) > 1e-3  # the amplified outputs do differ
    assert removal._prediction_heads(m, x) == ["head"]


def test_a_head_with_noise_gives_no_head_check_and_the_amplified_output_is_refused():
    from bayesprune import removal

    with pytest.raises(RuntimeError, match="shrink refuses the network|could not reproduce"):
        _amplifying(exclude_output_layer=False)  # prune's count shrinks
    torch.manual_seed(0)
    m, x = _Amplifying(), torch.randn(2, 3, 10, 10)
    bp.add_noise(m, x, exclude_output_layer=False)

    assert removal._prediction_heads(m, x) == []


def _rel(a, b):
    return float((a - b).abs().max() / a.abs().max())


class _DetectsNothing(nn.Module):
    """A detector in small: conv features, then the scores above a threshold ("empty": one no
    score reaches, as random weights detect nothing; "all": every score), or a zero-initialised
    last layer ("zero": outputs all zero, as torchvision's ViT head)."""

    def __init__(self, mode: str):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
        self.threshold = {"empty": 1e9}.get(mode, -1e9)
        if mode == "zero":
            nn.init.zeros_(self.body[2].weight)
            nn.init.zeros_(self.body[2].bias)

    def forward(self, x):
        scores = self.body(x).flatten()
        return scores[scores > self.threshold]


@pytest.mark.parametrize("mode", ["empty", "zero", "all"])
def test_shrink_warns_when_the_outputs_it_checks_are_empty(mode):
    """With empty or all-zero outputs the check compares nothing: shrink says so
    (ShrinkVerificationWarning) instead of passing silently; with outputs it warns nothing."""
    import warnings

    torch.manual_seed(0)
    m, x = _DetectsNothing(mode).eval(), torch.randn(2, 3, 8, 8)
    bp.add_noise(m, x)
    with torch.no_grad():
        for n in bp.noise_layers(m):
            n.mu[:3] = -19.0
    with warnings.catch_warnings(record=True) as caught:  # prune's count is the shrunk network's: it shrinks
        warnings.simplefilter("always")
        bp.prune(m, "etheta")
        small = bp.shrink(m)
    found = [w for w in caught if issubclass(w.category, bp.ShrinkVerificationWarning)]
    assert small.body[0].out_channels == 5
    if mode != "all":
        assert len(found) == 1 and "outputs on all 3 verification inputs are empty or all zero" in str(found[0].message)
    else:
        assert not found
        with torch.no_grad():
            assert _rel(m(x), small(x)) < 1e-5


def _live(cls) -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is cls)


def test_shrink_holds_at_most_three_copies_of_the_network(monkeypatch):
    """The model, its folded copy and one trial: the twin with random BatchNorm statistics is
    remade for its check and dropped before the trial that is kept (a 644 M-parameter RegNet ran
    out of memory with five copies)."""
    torch.manual_seed(0)
    model = torchvision_model("resnet18", 10)
    _randomise_bn(model)
    x = torch.randn(2, 3, 8, 8)
    bp.add_noise(model, x[:1])
    _random_masks(model)
    live = []
    real = bp.removal._remove_structures

    def counted(*args, **kwargs):
        live.append(_live(type(model)))
        out = real(*args, **kwargs)
        live.append(_live(type(model)))
        return out

    monkeypatch.setattr(bp.removal, "_remove_structures", counted)
    shrunk = bp.shrink(model, x[:1])
    _check(model, shrunk, x)
    assert len(live) == 4  # the twin's removal, then the kept trial's
    assert max(live) <= 3, live


def test_the_traced_graph_keeps_no_activations():
    """Torch-Pruning's graph holds the traced forward's autograd nodes; the tensors they saved for
    a backward that never runs are kept as meta-device shapes (numbers stay themselves)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    graph = bp.removal._build_graph(model, torch.randn(2, 3, 8, 8))
    conv = graph.module2node[model[0]].grad_fn
    assert type(conv).__name__.startswith("ConvolutionBackward")
    assert conv._saved_input.device.type == "meta" and conv._saved_input.shape == (2, 3, 8, 8)
    assert conv._saved_weight.device.type == "meta"
    assert conv._saved_weight.shape == model[0].weight.shape


class ResidualMLP(nn.Module):
    """x + fc2(gelu(fc1(ln(x)))), a transformer's MLP sub-layer, with a side reader of fc1."""

    def __init__(self, side: bool = False):
        super().__init__()
        self.emb, self.ln = nn.Linear(8, 16), nn.LayerNorm(16)
        self.fc1, self.act, self.fc2 = nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)
        self.side = nn.Linear(32, 3) if side else None
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        h = self.emb(x)
        a = self.act(self.fc1(self.ln(h)))
        out = self.head(h + self.fc2(a))
        return out + self.side(a) if self.side is not None else out


def _mask_whole(model, name):
    with torch.no_grad():
        next(n for n in bp.noise_layers(model) if n.layer_name == name).mask.zero_()


def test_a_layer_masked_whole_takes_what_only_it_reads_with_it():
    """fc2's outputs are tied to the residual stream (none can leave), but masked whole fc2
    computes zeros: fc1's hidden units, read only by it, go (one stays), exactly; the count, the
    fast estimate, shrink_for_training and a replay of the recorded steps agree."""
    torch.manual_seed(0)
    model, x = ResidualMLP(), torch.randn(5, 8)
    bp.add_noise(model, x[:1], layers=["fc1", "fc2"])
    _mask_whole(model, "fc2")
    shrunk = bp.shrink(model, x[:1])
    assert (shrunk.fc1.out_features, shrunk.fc2.in_features, shrunk.fc2.out_features) == (1, 1, 16)
    _check(model, shrunk, x)
    n = bp.count_parameters(shrunk)
    assert n == bp.count_parameters(model) - 31 * (16 + 1) - 31 * 16
    assert n == bp.remaining_parameters(model, x[:1]) == bp.counting._estimated_remaining(model, x[:1])
    assert ["fc2", False, list(range(1, 32))] in [list(s) for s in shrunk.bayesprune_pruning["steps"]]
    trainable = bp.removal.shrink_for_training(model, x[:1])
    _check(model, trainable, x)
    fc1_noise = next(k for k in bp.noise_layers(trainable) if k.layer_name == "fc1")
    assert fc1_noise.mask.shape == (1,)  # the upstream noise follows the one unit left
    replayed = bp.removal.replay_pruning(ResidualMLP(), x[:1], shrunk.bayesprune_pruning["steps"])
    assert bp.count_parameters(replayed) == n


def test_inputs_a_live_layer_also_reads_stay():
    torch.manual_seed(0)
    model, x = ResidualMLP(side=True), torch.randn(5, 8)
    bp.add_noise(model, x[:1], layers=["fc1", "fc2"])
    _mask_whole(model, "fc2")
    shrunk = bp.shrink(model, x[:1])
    assert (shrunk.fc1.out_features, shrunk.fc2.in_features) == (32, 32)
    _check(model, shrunk, x)


def test_a_residual_branch_masked_whole_goes_but_one_channel():
    """torchvision ResNet-18, noise after every BatchNorm: layer1.0's second BatchNorm masked whole
    makes its branch a zero; conv1/bn1 of the block keep one channel, conv2 reads one."""
    torch.manual_seed(0)
    model = torchvision_model("resnet18", 10)
    _randomise_bn(model)
    x = torch.randn(2, 3, 16, 16)
    bp.add_noise(model, x[:1])
    _mask_whole(model, "layer1.0.conv2")
    shrunk = bp.shrink(model, x[:1])
    assert shrunk.layer1[0].conv1.out_channels == 1 and shrunk.layer1[0].conv2.in_channels == 1
    assert shrunk.layer1[0].conv2.out_channels == 64  # the residual width stays
    _check(model, shrunk, x)
    assert bp.count_parameters(shrunk) == bp.remaining_parameters(model, x[:1])


def test_verification_inputs_of_a_list_of_images_are_random_single_images():
    """A detector's argument is a list of images: the random verification inputs are new images
    (one each, like the first), not the example again; batches are cut to their first row."""
    images = [torch.rand(3, 20, 24), torch.rand(3, 20, 24)]
    probes = bp.removal._probes((images,))
    assert probes[0] == (images,)
    for p, (mean, std) in zip(probes[1:], ((0.0, 1.0), (0.5, 2.0))):
        (got,) = p
        assert isinstance(got, list) and len(got) == 1 and got[0].shape == (3, 20, 24)
        assert abs(float(got[0].mean()) - mean) < 0.1 and abs(float(got[0].std()) - std) < 0.1
    x, y = torch.randn(2, 3), torch.randn(2, 5)
    assert [t.shape for t in bp.removal._probes((x, y))[1]] == [(1, 3), (1, 5)]
    assert [t.shape for t in bp.removal._probes((x, torch.randn(3, 5)))[2]] == [(2, 3), (3, 5)]  # no common batch
    assert bp.removal._probes({"a": x})[1]["a"].shape == (1, 3)


class TokenNet(nn.Module):
    """Convolution features as tokens behind a learned class token (an unwrapped parameter that
    Torch-Pruning prunes as a node of its own); the forward pass replaces a list attribute, as
    torchvision's anchor generator moves its cell anchors to the input's device."""

    def __init__(self, values: bool = False):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.fc = nn.Linear(8, 4)
        self.anchors = [torch.zeros(2)]
        self.values = values

    def forward(self, x):
        self.anchors = [a.to(x.device) for a in self.anchors]
        t = self.bn(self.conv(x)).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        if self.values and float(t.detach().sum()) > 1e9:  # a value decides: no meta trace
            t = t * 0
        return self.fc(t.mean(1))


def _graph_signature(graph) -> set:
    def name(n):
        return "param" + str(tuple(n.module.shape)) if isinstance(n.module, nn.Parameter) else str(n.name or type(n.module).__name__)

    return {(name(n), str(n.type), len(n.inputs), len(n.outputs),
             tuple(sorted((name(d.target), getattr(d.handler, "__name__", type(d.handler).__name__)) for d in n.dependencies)))
            for n in graph.module2node.values()}


@pytest.mark.parametrize("values", [False, True])
def test_the_graph_is_traced_on_the_meta_device_unless_a_value_is_needed(values):
    """The dependency graph is traced with every tensor on the meta device (no arithmetic) and
    equals the graph of a real forward pass; the model keeps its own parameters and state; where
    a value is needed (``float(t.sum())``) the graph is traced on the real tensors."""
    torch.manual_seed(0)
    model = TokenNet(values).eval()
    params = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    anchors = model.anchors
    x = torch.randn(2, 3, 6, 6)
    graph = bp.removal._build_graph(model, x)
    traced_on = graph.module2node[model.conv].grad_fn._input_metadata[0].device.type
    assert traced_on == ("cpu" if values else "meta")
    for n, (p, v) in params.items():
        got = model.get_parameter(n)
        assert got is p and got.device.type == "cpu" and torch.equal(got, v)
    assert all(torch.equal(model.get_buffer(n), b) for n, b in buffers.items())
    assert model.anchors[0].device.type == "cpu"
    assert (model.anchors is anchors) != values  # (the real forward pass of the fallback replaces it)
    assert graph.module2node[model.cls].module is model.cls  # the real class token, not its stand-in
    real, _ = bp.removal._trace(model, x)
    bp.removal._fix_flatten_mappings(real)
    assert _graph_signature(graph) == _graph_signature(real)


def test_a_class_token_traced_on_meta_is_pruned_on_the_real_model():
    """Removing convolution channels takes the class token's matching entries with them (the
    graph traced on stand-ins points at the real parameter) and the output stays (those entries
    are zero: else the token keeps the channels alive, and shrink rightly keeps them)."""
    torch.manual_seed(0)
    model = TokenNet().eval()
    _randomise_bn(model)
    x = torch.randn(2, 3, 6, 6)
    bp.add_noise(model, x[:1])
    with torch.no_grad():
        next(n for n in bp.noise_layers(model) if n.layer_name == "conv").mask[[1, 4, 6]] = 0
        model.cls[..., [1, 4, 6]] = 0
    shrunk = bp.shrink(model, x[:1])
    assert shrunk.conv.out_channels == 5 and shrunk.cls.shape == (1, 1, 5) and shrunk.fc.in_features == 5
    _check(model, shrunk, x)


@pytest.mark.parametrize("kind", ["sdpa", "sdpa-mask-with-gradient", "multihead"])
def test_attention_traced_on_meta_runs_the_kernel_the_cpu_picks(kind):
    """scaled_dot_product_attention runs one fused kernel on CPU (one autograd node) but would
    decompose on the meta device: the meta trace calls the kernel the CPU picks (the fused one; the
    math path where a mask needs a gradient; inside nn.MultiheadAttention too), and the graph
    equals the real forward pass's."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)
            self.bias = nn.Parameter(torch.randn(1, 2, 5, 5)) if kind == "sdpa-mask-with-gradient" else None
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True) if kind == "multihead" else None

        def forward(self, x):
            if self.mha is not None:
                return self.out(self.mha(x, x, x, need_weights=False)[0])
            q, k, v = self.qkv(x).view(*x.shape[:2], 3, 2, 4).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)
            return self.out(a.transpose(1, 2).flatten(2))

    model = Attention().eval()
    x = torch.randn(2, 5, 8)
    graph = bp.removal._build_graph(model, x)
    assert graph.module2node[model.out].grad_fn._input_metadata[0].device.type == "meta"
    names = {type(n.grad_fn).__name__ for n in graph.module2node.values()}
    assert ("ScaledDotProductFlashAttentionForCpuBackward0" in names) == (kind != "sdpa-mask-with-gradient")
    assert (model.mha if kind == "multihead" else model.qkv) in graph.module2node
    real, _ = bp.removal._trace(model, x)
    assert _graph_signature(graph) == _graph_signature(real)
