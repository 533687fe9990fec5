"""Noise layers: placement on a mixed model, module semantics, KL, state_dict, errors.

The mixed test model has a residual block (conv-BN-ReLU-conv-BN + identity add, with one ReLU
module shared by both activations as in torchvision), a conv -> flatten -> linear path, and a
hand-written self-attention block over token sequences [batch, tokens, features] with an MLP;
it takes two inputs (image, tokens).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.special import ndtr
from torch import nn

import bayesprune
from bayesprune import MultiplicativeNoise, TruncatedLogNormal, add_noise, kl, noise_layers

CUDA_SKIP = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="CUDA not available on this machine: the CUDA variant is NOT exercised here and is not coverage",
)
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA_SKIP)]


# ---------------------------------------------------------------------------------------------
# test models


from mixed_model import Attention, Net, ResBlock  # noqa: E402,F401


def inputs(batch: int = 6):
    return torch.randn(batch, 3, 8, 8), torch.randn(batch, Net.T, Net.D)


# expected placement: (layer, target, dim, structures), in forward order; head excluded
EXPECTED = [
    ("stem", "stem_act", 1, 8),  # own ReLU used once: after the activation
    ("block.conv1", "block.bn1", 1, 8),  # shared ReLU: after the BatchNorm
    ("block.conv2", "block.bn2", 1, 8),  # BN output goes to the residual add
    ("conv3", "act3", 1, 4),
    ("fc", "fc_act", -1, 32),  # plain Linear-ReLU: after the activation
    ("attn.q", "attn.q", -1, 8),  # [B,T,F]: feature dim is the last one
    ("attn.k", "attn.k", -1, 8),
    ("attn.v", "attn.v", -1, 8),
    ("attn.out", "attn.out", -1, 8),
    ("attn.fc1", "attn.act", -1, 16),
    ("attn.fc2", "attn.fc2", -1, 8),
]


def make_net(seed: int = 0, **noise_kwargs):
    torch.manual_seed(seed)
    model = Net()
    x = inputs()
    add_noise(model, x, **noise_kwargs)
    return model, x


def forward_order(model, x):
    """Names of the Linear/Conv modules in the order a forward pass calls them."""
    names = {m: n for n, m in model.named_modules()}
    seen, handles = [], []
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            handles.append(m.register_forward_hook(lambda mod, i, o: seen.append(names[mod])))
    with torch.no_grad():
        model.eval()(*x)
    for h in handles:
        h.remove()
    return seen


# ---------------------------------------------------------------------------------------------
# placement


def test_placement_on_mixed_model():
    model, x = make_net()
    layers = noise_layers(model)
    got = [(n.layer_name, n.target_name, n.dim, n.num_structures) for n in layers]
    assert got == EXPECTED
    # forward order and the output layer excluded
    assert [n.layer_name for n in layers] == forward_order(model, x)[:-1]
    assert "head" not in [n.layer_name for n in layers]
    # each noise module is the child `bayes_noise` of its layer and its hook sits on the target
    for n in layers:
        assert model.get_submodule(n.layer_name).bayes_noise is n
        assert n.chain[0] == n.layer_name and n.chain[-1] == n.target_name
        target = model.get_submodule(n.target_name)
        assert any(getattr(fn, "__self__", None) is n for fn in target._forward_hooks.values())
        assert n.mu.shape == n.log_sigma.shape == n.mask.shape == (n.num_structures,)
        assert torch.equal(n.mask, torch.ones(n.num_structures))


def test_noise_multiplies_the_target_output_along_its_dim():
    """Capture each target's output (before the noise hook) and the noise output, in eval mode."""
    model, x = make_net()
    model.eval()
    layers = noise_layers(model)
    with torch.no_grad():
        for i, n in enumerate(layers):
            n.mu.copy_(torch.linspace(-0.5, -0.1, n.num_structures) - 0.01 * i)
            n.log_sigma.fill_(-1.0)
    captured = {}
    handles = []
    for n in layers:
        target = model.get_submodule(n.target_name)
        # registered after the noise hook: sees the noisy output; a pre-existing hook order is kept
        handles.append(target.register_forward_hook(lambda m, i, o, key=n.layer_name: captured.__setitem__(key, o)))
    raw = {}
    for n in layers:
        # the raw output is the noise module's input: hook the noise module itself
        handles.append(n.register_forward_hook(lambda m, i, o, key=n.layer_name: raw.__setitem__(key, i[0])))
    with torch.no_grad():
        model(*x)
    for h in handles:
        h.remove()
    for n in layers:
        h, out = raw[n.layer_name], captured[n.layer_name]
        shape = [1] * h.ndim
        shape[n.dim % h.ndim] = n.num_structures
        assert h.shape[n.dim % h.ndim] == n.num_structures
        torch.testing.assert_close(out, h * n.expected_theta().view(shape))
    assert raw["attn.q"].shape == (6, Net.T, Net.D)  # [B,T,F]: noise on the feature dim


def test_placement_layer_and_explicit_layers():
    torch.manual_seed(0)
    model, x = Net(), inputs(2)
    add_noise(model, x, placement="layer")
    assert all(n.target_name == n.layer_name for n in noise_layers(model))
    bayesprune.remove_noise(model)
    assert noise_layers(model) == []
    add_noise(model, x, layers=["fc", "block.conv1"])
    assert [(n.layer_name, n.target_name) for n in noise_layers(model)] == [("block.conv1", "block.bn1"), ("fc", "fc_act")]


@pytest.mark.parametrize("act, target", [(nn.ReLU, "2"), (nn.LeakyReLU, "2"), (nn.Hardswish, "1"), (nn.SiLU, "1"),
                                         (nn.GELU, "1"), (nn.Tanh, "1"), (nn.Sigmoid, "2"), (nn.Hardsigmoid, "2")])
def test_noise_after_a_batchnorm_stays_before_an_activation_it_cannot_pass(act, target):
    """conv -> BatchNorm -> act: past a positively homogeneous act (the same function), before one
    that is not but maps 0 to 0 (noise there folds exactly into the BatchNorm), after one whose
    act(0) is not 0 (theta = 0 before a sigmoid would leave 0.5, not a removed channel)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act(), nn.Flatten(), nn.Linear(36, 2))
    add_noise(model, torch.randn(2, 3, 5, 5))
    assert [n.target_name for n in noise_layers(model)] == [target]
    # a layer the example does not run is placed from its nn.Sequential siblings by the same rule
    from bayesprune.noise import _chain_from_sequential

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act())
    assert _chain_from_sequential(model, "0", "auto", "channel")[-1] == target


def test_example_inputs_required_and_kept_with_the_noise_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="needs example_inputs"):
        add_noise(model, None)
    with pytest.raises(TypeError):
        add_noise(model)  # noqa: the input is a required argument
    assert noise_layers(model) == []
    x = torch.randn(3, 6)
    add_noise(model, x)
    got = [(n.layer_name, n.target_name, n.dim) for n in noise_layers(model)]
    assert got == [("0", "1", -1), ("2", "3", -1)]  # after the BatchNorm, before the Tanh
    assert bayesprune.stored_example_inputs(model) is x
    assert not hasattr(model, "bayes_example_inputs")  # not a loose attribute of the user's module
    assert all(n.example_inputs is x for n in noise_layers(model))
    assert not any("example" in k for k in model.state_dict())  # not saved with the weights
    bayesprune.remove_noise(model)
    assert bayesprune.stored_example_inputs(model) is None


def test_layer_not_run_by_the_example_follows_its_sequential_siblings():
    """A chosen layer that the example's forward pass does not run (a branch not taken) is
    placed from its nn.Sequential siblings."""

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.main = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
            self.other = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))

        def forward(self, x):
            return self.main(x)

    model = Branchy()
    add_noise(model, torch.randn(3, 6), layers=["main.0", "other.0"])
    got = [(n.layer_name, n.target_name) for n in noise_layers(model)]
    assert got == [("main.0", "main.1"), ("other.0", "other.1")]  # before the Tanh, after the BatchNorm


# ---------------------------------------------------------------------------------------------
# module semantics


def expected_theta_formula(mu: float, sigma: float, a: float, b: float) -> float:
    """docs/maths.md section 1, float64 via scipy: exp(mu + s^2/2) (Phi(beta - s) - Phi(alpha - s)) / Z."""
    alpha, beta = (a - mu) / sigma, (b - mu) / sigma
    z = ndtr(beta) - ndtr(alpha)
    return math.exp(mu + sigma**2 / 2) * (ndtr(beta - sigma) - ndtr(alpha - sigma)) / z


@pytest.mark.parametrize("device", DEVICES)
def test_eval_output_is_h_times_expected_theta_times_mask(device):
    torch.manual_seed(1)
    a, b = -6.0, -0.2
    noise = MultiplicativeNoise(5, dim=1, a=a, b=b).to(device)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-3.0, -1.0, 0.5, -5.5, -0.3]))
        noise.log_sigma.copy_(torch.tensor([-1.0, 0.0, -0.5, 0.3, -5.0]))
        noise.mask[3] = 0
    noise.eval()
    h = torch.randn(4, 5, 3, 2, device=device)
    with torch.no_grad():
        out = noise(h)
    mean = TruncatedLogNormal(noise.mu, noise.sigma, a, b).mean
    torch.testing.assert_close(noise.expected_theta(), mean)
    want = [expected_theta_formula(m, s, a, b) for m, s in zip(noise.mu.tolist(), noise.sigma.tolist())]
    torch.testing.assert_close(mean.double().cpu(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)
    scale = (mean * noise.mask).view(1, 5, 1, 1)
    torch.testing.assert_close(out, h * scale)
    assert bool((out[:, 3] == 0).all())
    # also with autograd on (no cache) and deterministic: eval draws nothing
    torch.testing.assert_close(noise(h), out)


@pytest.mark.parametrize("device", DEVICES)
def test_train_draws_theta_within_bounds(device):
    torch.manual_seed(2)
    a, b = -3.0, -0.5
    noise = MultiplicativeNoise(4, dim=-1, a=a, b=b).to(device)
    with torch.no_grad():
        noise.mu.fill_(-1.5)
        noise.log_sigma.fill_(0.0)
    noise.train()
    h = torch.rand(8, 3, 4, device=device) + 0.5  # positive, away from 0
    out1, out2 = noise(h), noise(h)
    assert not torch.equal(out1, out2)
    for out in (out1, out2):
        ratio = out / h
        assert bool((ratio > 0).all())
        assert bool((ratio >= math.exp(a) * (1 - 1e-5)).all()) and bool((ratio <= math.exp(b) * (1 + 1e-5)).all())
    # differentiable in mu and log_sigma
    out1.sum().backward()
    assert noise.mu.grad is not None and bool(torch.isfinite(noise.mu.grad).all())
    assert noise.log_sigma.grad is not None and bool((noise.log_sigma.grad != 0).any())


def test_train_sample_mean_matches_expected_theta():
    torch.manual_seed(3)
    noise = MultiplicativeNoise(3, dim=1)
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-1.0, -0.2, -4.0]))
        noise.log_sigma.copy_(torch.tensor([-0.5, 0.0, 0.5]))
    h = torch.ones(20000, 3)
    with torch.no_grad():
        est = noise.train()(h).mean(0)
    torch.testing.assert_close(est, noise.expected_theta().detach(), rtol=0.03, atol=1e-3)


def test_sharing_channel_vs_element():
    torch.manual_seed(4)
    h = torch.rand(3, 4, 5, 6) + 0.5
    ratios = {}
    for sharing in ("channel", "element"):
        noise = MultiplicativeNoise(4, dim=1, sharing=sharing)
        with torch.no_grad():
            noise.mu.fill_(-1.0)
            noise.log_sigma.fill_(0.0)
        ratios[sharing] = noise.train()(h) / h
    ch = ratios["channel"]
    # channel: one theta per (example, channel), constant over spatial positions
    torch.testing.assert_close(ch, ch[:, :, :1, :1].expand_as(ch), rtol=1e-5, atol=0)
    assert ch[:, :, 0, 0].unique().numel() == 12  # but different across examples and channels
    el = ratios["element"]
    assert el[0, 0].unique().numel() > 1  # element: varies over positions
    # channel sharing on token sequences [B,T,F]: one theta per (example, feature), shared over tokens
    noise = MultiplicativeNoise(6, dim=-1, sharing="channel")
    with torch.no_grad():
        noise.mu.fill_(-1.0)
        noise.log_sigma.fill_(0.0)
    t = torch.rand(2, 5, 6) + 0.5
    r = noise.train()(t) / t
    torch.testing.assert_close(r, r[:, :1, :].expand_as(r), rtol=1e-5, atol=0)
    assert r[:, 0, :].unique().numel() == 12


def test_sharing_structure_one_draw_per_structure_for_the_whole_batch():
    torch.manual_seed(4)
    noise = MultiplicativeNoise(4, dim=1, sharing="structure")
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-1.0, -0.2, -4.0, -0.5]))
        noise.log_sigma.copy_(torch.tensor([-0.5, 0.0, 0.5, -1.0]))
    h = torch.rand(3, 4, 5, 6) + 0.5
    r = noise.train()(h) / h
    # one theta per channel, the same for every example and position ...
    torch.testing.assert_close(r, r[:1, :, :1, :1].expand_as(r), rtol=1e-5, atol=0)
    assert r[0, :, 0, 0].unique().numel() == 4
    # ... redrawn at every forward, with mean E[theta] (Monte Carlo over 20,000 forwards)
    with torch.no_grad():
        draws = torch.stack([noise(torch.ones(1, 4))[0] for _ in range(20000)])
    torch.testing.assert_close(draws.mean(0), noise.expected_theta().detach(), rtol=0.03, atol=1e-3)
    # and it moves past pooling like per-(example, channel) noise
    from bayesprune.experiments.models import LeNet5

    model = add_noise(LeNet5(1, 10, 32), torch.randn(2, 1, 32, 32), sharing="structure")
    assert [n.sharing for n in noise_layers(model)] == ["structure"] * 4
    assert all("Pool" in type(model.get_submodule(n.target_name)).__name__ for n in noise_layers(model)[:2])


@pytest.mark.parametrize("sharing", ["element", "channel", "structure"])
def test_masked_structures_output_exact_zero(sharing):
    torch.manual_seed(5)
    model, x = make_net(sharing=sharing)
    for n in noise_layers(model):
        n.mask[1] = 0
    outs = {}
    hooks = []
    for n in noise_layers(model):
        hooks.append(n.register_forward_hook(lambda m, i, o, key=n.layer_name: outs.__setitem__(key, o)))
    for train in (True, False):
        model.train(train)
        model(*x)
        for n in noise_layers(model):
            o = outs[n.layer_name]
            assert bool((o.select(n.dim % o.ndim, 1) == 0).all()), (n.layer_name, train)
            kept = torch.arange(n.num_structures) != 1
            assert bool((o.movedim(n.dim % o.ndim, 0)[kept] != 0).any()), (n.layer_name, train)
    for h in hooks:
        h.remove()


def test_monotone_masks_never_revive_and_overwrite_without():
    model, x = make_net()
    layers = noise_layers(model)
    layers[0].mask[2] = 0  # a structure that 'etheta' would keep (E[theta] ~ 1)
    bayesprune.prune(model, "etheta")
    assert layers[0].mask[2] == 0
    bayesprune.prune(model, "l2", threshold=0.0)  # every norm > 0: keeps all
    assert layers[0].mask[2] == 0
    bayesprune.prune(model, "etheta", monotone=False)
    assert layers[0].mask[2] == 1
    layers[0].mask[2] = 0
    bayesprune.prune(model, "l2", threshold=0.0, monotone=False)
    assert layers[0].mask[2] == 1
    assert all(bool((n.mask == 1).all()) for n in layers)


# ---------------------------------------------------------------------------------------------
# KL and training


@pytest.mark.parametrize("mixed_bounds", [False, True])
def test_kl_weightings_match_hand_formula(mixed_bounds):
    """The batched KL (one call on all structures) and the per-layer one (layers whose bounds
    differ) both equal the per-layer formula."""
    model, x = make_net()
    layers = noise_layers(model)
    torch.manual_seed(6)
    with torch.no_grad():
        for n in layers:
            n.mu.copy_(torch.empty(n.num_structures).uniform_(-15, 0))
            n.log_sigma.copy_(torch.empty(n.num_structures).uniform_(-4, 1))
    if mixed_bounds:
        layers[0].a = -16.0
    per_layer = [n.kl() for n in layers]
    mean = sum(k.mean() for k in per_layer) / len(per_layer)
    total = sum(k.sum() for k in per_layer)
    torch.testing.assert_close(kl(model, "mean"), mean)
    torch.testing.assert_close(kl(model), mean)  # default is the reference's "mean"
    torch.testing.assert_close(kl(model, "elbo", num_train=1234), total / 1234)
    torch.testing.assert_close(kl(model, "sum"), total)


def test_layer_kl_matches_math_formula():
    """KL = log(b-a) - log Z - log sigma - 0.5 log(2 pi e) - (alpha phi(alpha) - beta phi(beta)) / (2Z)."""
    noise = MultiplicativeNoise(4)
    mu = [-1.0, -5.0, 0.3, -10.0]
    ls = [-1.0, 0.5, -2.0, 1.0]
    with torch.no_grad():
        noise.mu.copy_(torch.tensor(mu))
        noise.log_sigma.copy_(torch.tensor(ls))
    a, b = noise.a, noise.b
    want = []
    for m, l in zip(mu, ls):
        s = math.exp(l)
        al, be = (a - m) / s, (b - m) / s
        z = ndtr(be) - ndtr(al)
        phi = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        want.append(
            math.log(b - a) - math.log(z) - l - 0.5 * math.log(2 * math.pi * math.e) - (al * phi(al) - be * phi(be)) / (2 * z)
        )
    torch.testing.assert_close(noise.kl().double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighting", ["mean", "elbo"])
def test_training_steps_with_kl(weighting):
    model, x = make_net()
    torch.manual_seed(7)
    y = torch.randint(0, 5, (x[0].shape[0],))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mu0 = [n.mu.detach().clone() for n in noise_layers(model)]
    model.train()
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = F.cross_entropy(model(*x), y) + kl(model, weighting, num_train=60000)
        loss.backward()
        for n in noise_layers(model):
            assert n.mu.grad is not None and bool(torch.isfinite(n.mu.grad).all())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(n.mu, m0) for n, m0 in zip(noise_layers(model), mu0))
    model.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(model(*x)).all())


# ---------------------------------------------------------------------------------------------
# state_dict and devices


def _perturb(model):
    torch.manual_seed(8)
    with torch.no_grad():
        for n in noise_layers(model):
            n.mu.copy_(torch.empty(n.num_structures).uniform_(-2, 0))
            n.log_sigma.copy_(torch.empty(n.num_structures).uniform_(-3, 0))
            n.mask[0] = 0
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)


def test_state_dict_round_trip(tmp_path):
    model, x = make_net(seed=0)
    _perturb(model)
    model.eval()
    with torch.no_grad():
        want = model(*x)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    fresh, _ = make_net(seed=123)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        got = fresh(*x)
    assert torch.equal(got, want)
    for n, m in zip(noise_layers(fresh), noise_layers(model)):
        assert torch.equal(n.mu, m.mu) and torch.equal(n.log_sigma, m.log_sigma) and torch.equal(n.mask, m.mask)


def test_eval_cache_sees_loaded_and_in_place_changes():
    """The eval path may cache E[theta]*mask; it must follow load_state_dict and in-place edits."""
    model, x = make_net()
    model.eval()
    n = noise_layers(model)[-1]
    with torch.no_grad():
        before = model(*x)
        other, _ = make_net(seed=9)
        _perturb(other)
        model.load_state_dict(other.state_dict())
        other.eval()
        loaded = model(*x)
        torch.testing.assert_close(loaded, other(*x))
        assert not torch.allclose(loaded, before)
        saved = n.mask.clone()
        n.mask.fill_(0)
        masked = model(*x)
        assert not torch.allclose(masked, loaded)
        n.mask.copy_(saved)
        torch.testing.assert_close(model(*x), loaded)
        n.mu.fill_(-19.0)  # in place under no_grad: E[theta] ~ e^-19 acts like a mask
        n.log_sigma.fill_(-3.0)
        torch.testing.assert_close(model(*x), masked, atol=1e-6, rtol=0)




def test_eval_cache_sees_writes_through_data():
    model, x = make_net()
    model.eval()
    n = noise_layers(model)[-1]
    with torch.no_grad():
        before = model(*x)
        n.mu.data.fill_(-19.0)
        n.log_sigma.data.fill_(-3.0)
        after = model(*x)
        n.mask.fill_(0)
        masked = model(*x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, masked, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_device_end_to_end(tmp_path, device):
    """Train, prune with every criterion, save and load on ``device`` (CUDA where there is one)."""
    model, x = make_net()
    model, x = model.to(device), tuple(t.to(device) for t in x)
    assert all(n.mu.device.type == device and n.mask.device.type == device for n in noise_layers(model))
    y = torch.randint(0, 5, (x[0].shape[0],), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for sharing_model in (model,):
        sharing_model.train()
        loss = F.cross_entropy(sharing_model(*x), y) + kl(sharing_model, "elbo", num_train=100)
        loss.backward()
        opt.step()
    for crit in ("bmrs_n", "bmrs_u", "snr", "etheta"):
        bayesprune.prune(model, crit)
    bayesprune.prune(model, "l2", compression=0.3)
    bayesprune.prune(model, "grad", compression=0.5)
    model.eval()
    with torch.no_grad():
        want = model(*x)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh, _ = make_net(seed=5)
    fresh.to(device).load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    with torch.no_grad():
        assert torch.equal(fresh.eval()(*x), want)


# ---------------------------------------------------------------------------------------------
# errors


def test_error_bounds_a_not_below_b():
    with pytest.raises(ValueError, match="a < b"):
        MultiplicativeNoise(3, a=0.0, b=0.0)
    with pytest.raises(ValueError, match="a < b"):
        MultiplicativeNoise(3, a=1.0, b=-1.0)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="a < b"):
        add_noise(Net(), inputs(2), a=-1.0, b=-2.0)


def test_error_shape_mismatch_names_layer_and_shape():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 10), nn.ReLU(), nn.Linear(10, 2))
    add_noise(model, torch.randn(2, 3, 6, 6))
    model.eval()
    # an unbatched image [3,6,6]: Conv2d accepts it and returns [8,4,4]; dim 1 then holds 4, not 8
    with pytest.raises(ValueError) as err:
        with torch.no_grad():
            model(torch.randn(3, 6, 6))
    msg = str(err.value)
    assert "'0'" in msg and "(8, 4, 4)" in msg and "8 structures" in msg
    fc = noise_layers(model)[1]  # features on dim -1
    with pytest.raises(ValueError, match=r"'3'.*\(2, 31\)"):
        fc(torch.randn(2, 31))




@pytest.mark.parametrize("train", [True, False])
def test_error_nan_parameters_in_forward(train):
    model, x = make_net()
    model.train(train)
    with torch.no_grad():
        model(*x)  # fill any eval cache first
        noise_layers(model)[2].mu[3] = float("nan")
        with pytest.raises(FloatingPointError, match="block.conv2"):
            model(*x)
    with pytest.raises(FloatingPointError, match="block.conv2"):
        model(*x)


def test_error_nan_set_through_data_in_eval():
    model, x = make_net()
    model.eval()
    with torch.no_grad():
        model(*x)  # fill any eval cache first
        noise_layers(model)[1].log_sigma.data[0] = float("nan")
        with pytest.raises(FloatingPointError, match="block.conv1"):
            model(*x)


def test_error_add_noise_twice():
    model, x = make_net()
    with pytest.raises(ValueError, match="already has noise"):
        add_noise(model, x)


def test_error_kl_weighting_and_num_train():
    model, _ = make_net()
    with pytest.raises(ValueError, match="unknown KL weighting 'bogus'.*mean.*elbo"):
        kl(model, "bogus")
    with pytest.raises(ValueError, match="num_train"):
        kl(model, "elbo")
    with pytest.raises(ValueError, match="num_train"):
        kl(model, "elbo", num_train=0)
    with pytest.raises(ValueError, match="no noise layers"):
        kl(nn.Linear(2, 2))


def test_channel_noise_moves_past_pooling_and_computes_the_same_function():
    """With one draw per (example, channel), noise on LeNet5's convolutions goes after the
    max-pool (pool(h theta) = pool(h) theta for theta > 0); the training output and every
    gradient equal those of noise placed right after the convolution (ReLU commutes too)."""
    from bayesprune.experiments.models import LeNet5

    x = torch.randn(8, 1, 32, 32)
    y = torch.randint(0, 10, (8,))
    out, grads = {}, {}
    for placement in ("auto", "layer"):
        torch.manual_seed(0)
        model = LeNet5(1, 10, 32)
        bayesprune.add_noise(model, x[:2], sharing="channel", placement=placement, mu_init=-0.5, log_sigma_init=-1.0)
        targets = [n.target_name for n in noise_layers(model)]
        if placement == "auto":
            assert targets == ["2", "5", "8", "10"]  # MaxPool2d, MaxPool2d, ReLU, ReLU
        else:
            assert targets == ["0", "3", "7", "9"]
        torch.manual_seed(1)
        loss = F.cross_entropy(model.train()(x), y)
        loss.backward()
        out[placement] = loss.detach()
        grads[placement] = [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(out["auto"], out["layer"], rtol=1e-6, atol=0)
    for ga, gb in zip(grads["auto"], grads["layer"]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    # per-element draws do not commute with pooling: they stay after the activation
    model = bayesprune.add_noise(LeNet5(1, 10, 32), x[:2], sharing="element")
    assert [n.target_name for n in noise_layers(model)] == ["1", "4", "8", "10"]


# ---------------------------------------------------------------------------------------------
# joint draw: one sampler call per training forward for all per-(example, channel) layers


def _lenet(seed=0, sharing="channel"):
    from bayesprune.experiments.models import LeNet5

    torch.manual_seed(seed)
    model = LeNet5(in_channels=1, num_classes=10, image_size=32)
    x = torch.randn(5, 1, 32, 32)
    add_noise(model, x[:2], sharing=sharing)
    with torch.no_grad():
        for n in noise_layers(model):  # spread the posteriors: bounds, mirrored and plain cases
            n.mu.copy_(torch.linspace(-21.0, 0.5, n.num_structures))
            n.log_sigma.copy_(torch.linspace(-3.0, 1.0, n.num_structures))
            n.mask[0] = 0
    return model.train(), x


@pytest.mark.parametrize("sharing", ["channel", "structure"])
def test_joint_draw_uses_one_uniform_block_and_gives_each_layer_its_exact_gradient(sharing):
    """Outputs are h * theta with theta from one [batch, all structures] block of uniforms
    ([1, all structures] for sharing="structure"; the layers' slices, in forward order); each
    layer's mu/log_sigma gradient equals the implicit gradient of its own draw given the upstream
    gradient, computed separately."""
    from bayesprune.distributions import draw_theta

    model, x = _lenet(sharing=sharing)
    rows = 5 if sharing == "channel" else 1
    layers = noise_layers(model)
    seen = {}
    for n in layers:
        def hook(mod, inp, out, n=n):
            seen[n.layer_name] = {"h": inp[0].detach()}
            out.register_hook(lambda g, n=n: seen[n.layer_name].__setitem__("g", g.detach()))
        n.register_forward_hook(hook)
    torch.manual_seed(123)
    (model(x) * torch.randn(5, 10, generator=torch.Generator().manual_seed(1))).sum().backward()
    torch.manual_seed(123)
    u_all = torch.rand(rows, sum(n.num_structures for n in layers))
    for n, u in zip(layers, u_all.split([n.num_structures for n in layers], dim=1)):
        h, g = seen[n.layer_name]["h"], seen[n.layer_name]["g"]
        shape = [1] * h.ndim
        shape[1] = n.num_structures
        ushape = list(shape)
        ushape[0] = rows
        mu = n.mu.detach().clone().requires_grad_()
        ls = n.log_sigma.detach().clone().requires_grad_()
        theta = draw_theta(mu.view(shape), ls.clamp(*n.log_sigma_bounds).exp().view(shape), n.mask.view(shape), u.reshape(ushape))
        out = h * theta
        torch.autograd.backward(out, g)
        assert mu.grad.abs().sum() > 0, n.layer_name
        torch.testing.assert_close(n.mu.grad, mu.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(n.log_sigma.grad, ls.grad, rtol=1e-5, atol=1e-7)


def test_joint_draw_falls_back_to_own_draws():
    """A module called twice per forward gets two different draws; a submodule called outside the
    model's forward draws on its own; gradient accumulation over two forwards works; a failed
    forward leaves no joint draw behind; eval draws nothing."""
    from bayesprune import noise as noise_mod

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.fc(self.fc(x)))

    torch.manual_seed(0)
    model = Twice()
    add_noise(model, torch.randn(2, 4), sharing="channel")
    n = noise_layers(model)[0]
    with torch.no_grad():
        n.log_sigma.fill_(0.0)
        n.mu.fill_(-1.0)
    ratios = []
    n.register_forward_hook(lambda m, i, o: ratios.append(o / i[0]))
    model.train()
    x = torch.rand(3, 4) + 0.5
    model(x).sum().backward()
    assert len(ratios) == 2 and not torch.allclose(ratios[0], ratios[1])
    model(x).sum().backward()  # accumulate without an optimizer step
    assert torch.isfinite(n.mu.grad).all()
    # a submodule run directly (no model forward around it) still draws
    with torch.no_grad():
        r = model.fc(x) / F.linear(x, model.fc.weight, model.fc.bias)
    assert bool(((r > 0) & (r <= 1 + 1e-6)).all()) and r.unique().numel() == r.numel()
    assert getattr(noise_mod._DRAWS, "stack", []) == []
    with torch.no_grad():
        n.mu[1] = float("nan")
    with pytest.raises(FloatingPointError, match="'fc'.*mu"):
        model(x)  # the forward fails in the joint draw, naming the layer ...
    assert noise_mod._DRAWS.stack == []  # ... and leaves no joint draw behind
    with torch.no_grad():
        n.mu[1] = -1.0
    state = torch.random.get_rng_state()
    model.eval()(x)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_joint_draw_hooks_follow_copies_and_go_with_remove_noise():
    import copy

    model, x = _lenet()
    clone = copy.deepcopy(model)
    clone(x).sum().backward()
    assert all(n.mu.grad is not None for n in noise_layers(clone))
    assert all(n.mu.grad is None for n in noise_layers(model))  # the copy drew from its own parameters
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1
    bayesprune.remove_noise(model)
    assert len(model._forward_pre_hooks) == 0 and len(model._forward_hooks) == 0
    small = bayesprune.shrink_for_training(clone, x[:2])
    assert len(small._forward_pre_hooks) == 1  # the smaller noisy copy draws jointly too
    small.train()(x).sum().backward()
    assert all(n.mu.grad is not None for n in noise_layers(small))


# ---------------------------------------------------------------------------------------------
# dtype and device of the noise parameters; the meta device; the one default draw


def _typed_lenet(dtype, device="cpu"):
    from bayesprune.experiments.models import LeNet5

    torch.manual_seed(0)
    model = LeNet5(1, 10, 16).to(device=device, dtype=dtype)
    x = torch.randn(6, 1, 16, 16, dtype=dtype, device=device)
    add_noise(model, x[:2])
    return model, x


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_noise_parameters_follow_the_layer_dtype(dtype):
    model, x = _typed_lenet(dtype)
    layers = noise_layers(model)
    assert all(t.dtype == dtype for n in layers for t in (n.mu, n.log_sigma, n.mask))
    y = torch.randint(0, 10, (6,))
    for sharing_layer in layers:
        assert sharing_layer.sharing == "channel"
    model.train()
    out = model(x)
    assert out.dtype == dtype
    loss = F.cross_entropy(out.float(), y) + kl(model).float()
    loss.backward()
    for n in layers:
        assert n.mu.grad.dtype == dtype and bool(torch.isfinite(n.mu.grad).all()) and float(n.mu.grad.abs().sum()) > 0
    # E[theta] in the layer's dtype, equal to the float64 value rounded once
    n0 = layers[0]
    model.eval()
    with torch.no_grad():
        e = n0.expected_theta()
        e64 = TruncatedLogNormal(n0.mu.double(), n0.sigma.double(), n0.a, n0.b).mean
        assert e.dtype == dtype and torch.equal(e, e64.to(dtype))
    rep = bayesprune.prune(model, "l2", compression=0.4)
    assert rep.param_compression >= 0.4
    small = bayesprune.shrink(model)
    assert next(small.parameters()).dtype == dtype
    with torch.no_grad():
        ref, got = model(x).double(), small.eval()(x).double()
    tol = 1e-10 if dtype == torch.float64 else 4 * torch.finfo(dtype).eps
    assert float((ref - got).abs().max()) <= tol * float(ref.abs().max())


def test_float64_noise_draws_in_float64():
    """A float64 layer's training draws are float64 (not rounded through float32): the sample mean
    of theta over many draws matches E[theta] to float64-level Monte-Carlo error."""
    noise = MultiplicativeNoise(3, dim=-1, sharing="element").double()
    with torch.no_grad():
        noise.mu.copy_(torch.tensor([-1.0, -3.0, -0.2], dtype=torch.float64))
        noise.log_sigma.copy_(torch.log(torch.tensor([0.5, 1.0, 0.1], dtype=torch.float64)))
    torch.manual_seed(0)
    theta = noise.train()(torch.ones(200_000, 3, dtype=torch.float64))
    assert theta.dtype == torch.float64
    se = theta.std(0) / math.sqrt(theta.shape[0])
    assert bool(((theta.mean(0) - noise.expected_theta()).abs() < 4 * se).all())
    assert theta.unique().numel() > 199_000 * 3 * 0.99  # float32 rounding would collide far more


def test_meta_device_sizes_then_refuses_clearly():
    from bayesprune.experiments.models import LeNet5

    with torch.device("meta"):
        model = LeNet5(1, 10, 32)
    add_noise(model, torch.zeros(2, 1, 32, 32, device="meta"))
    layers = noise_layers(model)
    assert [n.num_structures for n in layers] == [6, 16, 120, 84]
    assert all(n.mu.is_meta and n.mask.is_meta for n in layers)
    real = LeNet5(1, 10, 32)
    assert bayesprune.count_parameters(model) == sum(p.numel() for p in real.parameters())
    for fn in (lambda: bayesprune.prune(model, "bmrs_n"), lambda: bayesprune.report(model), lambda: kl(model),
               lambda: bayesprune.shrink(model), lambda: bayesprune.remaining_parameters(model)):
        with pytest.raises(ValueError, match="meta device.*to_empty"):
            fn()
    model.to_empty(device="cpu")  # uninitialised memory: every module initialises its own again
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    x = torch.randn(2, 1, 32, 32)
    for n in noise_layers(model):
        n.example_inputs = x
    assert bayesprune.prune(model, "etheta").structures_kept == 226  # E[theta] ~ 1 at init


def test_one_default_noise_draw_for_add_noise_and_bayesprune_run():
    from bayesprune.experiments import cli
    from bayesprune.experiments.training import RunConfig

    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    add_noise(model, torch.randn(2, 4))
    args = cli.build_parser().parse_args(["run"])
    resolved = cli._resolved(args, seed=0)
    assert noise_layers(model)[0].sharing == resolved.sharing == RunConfig().sharing == bayesprune.DEFAULT_SHARING == "channel"
    assert MultiplicativeNoise(3).sharing == bayesprune.DEFAULT_SHARING
    add_noise(bayesprune.remove_noise(model), torch.randn(2, 4), sharing="element")  # the reference's draw
    assert noise_layers(model)[0].sharing == "element"
    with pytest.raises(ValueError, match="unknown sharing 'channels'"):
        add_noise(bayesprune.remove_noise(model), torch.randn(2, 4), sharing="channels")


def test_noise_added_to_a_model_in_eval_mode_is_in_eval_mode():
    """add_noise on a model already in eval mode: its noise layers use E[θ] (deterministic
    outputs) until model.train(), as every other module of the model would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    add_noise(model, x[:2])
    assert all(not n.training for n in noise_layers(model))
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
    model.train()
    assert all(n.training for n in noise_layers(model))
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
