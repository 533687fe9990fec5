"""round_to: kernel-friendly widths (pruning.round_masks, prune(round_to=), shrink(round_to=), --round-to)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesprune as bp
from bayesprune.pruning import round_masks

TOL = 1e-5  # max abs difference relative to the output scale


def _mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 13), nn.ReLU(), nn.Linear(13, 3))
    bp.add_noise(m, torch.randn(4, 6))
    return m.eval()


def _plant_norms(layer: nn.Linear, norms) -> None:
    """Rows of ``layer.weight`` rescaled to the given L2 norms (the l2 criterion's keep scores)."""
    with torch.no_grad():
        w = layer.weight
        w.mul_(torch.as_tensor(norms, dtype=w.dtype)[:, None] / w.norm(dim=1, keepdim=True))


class Residual(nn.Module):
    """stem -> (c1 -> c2) + stem -> head: stem's and c2's output channels are one coupled tensor."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.c1, self.bn1 = nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10)
        self.c2, self.bn2 = nn.Conv2d(10, 12, 3, padding=1), nn.BatchNorm2d(12)
        self.head = nn.Linear(12, 5)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(h + self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))))
        return self.head(h.mean((2, 3)))


def _residual(seed=0):
    torch.manual_seed(seed)
    m = Residual()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for bn in (m.bn0, m.bn1, m.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    bp.add_noise(m, torch.randn(2, 3, 8, 8))
    return m.eval()


def _random_masks(model, share, seed):
    g = torch.Generator().manual_seed(seed)
    for n in bp.noise_layers(model):
        n.mask[torch.randperm(n.num_structures, generator=g)[: int(share * n.num_structures)]] = 0


def _widths(model):
    return {name: (m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def _rel_err(a, b):
    return float((a - b).abs().max() / a.abs().max())


def test_round_to_keeps_the_highest_scores_among_the_removed():
    m = _mlp()
    g = torch.Generator().manual_seed(1)
    # layer 0: 7 structures above the threshold 1.0, 13 below it with distinct scores
    s0 = torch.cat([torch.linspace(2.0, 3.0, 7), torch.linspace(0.1, 0.9, 13)])[torch.randperm(20, generator=g)]
    s1 = torch.cat([torch.linspace(2.0, 3.0, 5), torch.linspace(0.1, 0.9, 8)])[torch.randperm(13, generator=g)]
    _plant_norms(m[0], s0)
    _plant_norms(m[2], s1)
    for k, want0, want1 in ((1, 7, 5), (4, 8, 8), (8, 8, 8), (16, 16, 13)):
        mk = copy.deepcopy(m)
        rep = bp.prune(mk, "l2", threshold=1.0, round_to=k)
        for noise, s, want in zip(bp.noise_layers(mk), (s0, s1), (want0, want1)):
            expected = torch.zeros(len(s), dtype=torch.bool)
            expected[torch.argsort(s, descending=True)[:want]] = True  # the `want` highest planted scores
            assert torch.equal(noise.mask != 0, expected), (k, noise.layer_name)
        assert [r.kept for r in rep.layers] == [want0, want1]
        assert rep.structures_kept_unrounded == 12 and rep.structures_kept == want0 + want1
        assert rep.round_to == k


def test_round_to_never_revives_what_an_earlier_step_removed_when_monotone():
    m = _mlp()
    s0 = torch.cat([torch.linspace(2.0, 3.0, 7), torch.linspace(0.1, 0.9, 13)])
    _plant_norms(m[0], s0)
    m[2].weight.data.mul_(10)  # layer 1 keeps everything
    first = bp.noise_layers(m)[0]
    first.mask[19] = 0  # the highest score below the threshold, removed by an earlier step
    bp.prune(m, "l2", threshold=1.0, round_to=4)
    assert (first.mask != 0).nonzero().flatten().tolist() == list(range(7)) + [18]  # 18, not 19
    m2 = _mlp()
    _plant_norms(m2[0], s0)
    m2[2].weight.data.mul_(10)
    bp.noise_layers(m2)[0].mask[19] = 0
    bp.prune(m2, "l2", threshold=1.0, round_to=4, monotone=False)
    assert (bp.noise_layers(m2)[0].mask != 0).nonzero().flatten().tolist() == list(range(7)) + [19]


@pytest.mark.parametrize("k", [4, 8])
def test_shrunk_widths_are_multiples_of_k_also_across_a_residual_addition(k):
    m = _residual()
    _random_masks(m, 0.6, seed=k)
    rep = round_masks(m, k)
    small = bp.shrink(m)
    w = _widths(small)
    assert w["stem"] == w["c2"]
    for name, total in (("stem", 12), ("c1", 10)):
        assert w[name] % k == 0 or w[name] == total, (name, w[name])
    # the coupled channel is kept if either layer keeps it; rounding revives it in both
    keep = (bp.noise_layers(m)[0].mask != 0) | (bp.noise_layers(m)[2].mask != 0)
    assert int(keep.sum()) == w["stem"]
    # the report counts what shrink leaves, with and without rounding
    unrounded = _residual()
    _random_masks(unrounded, 0.6, seed=k)
    assert rep.params_kept == bp.count_parameters(small)
    assert rep.params_kept_unrounded == bp.count_parameters(bp.shrink(unrounded))
    assert rep.params_total == bp.count_parameters(unrounded)
    assert rep.structures_kept_unrounded == sum(int((n.mask != 0).sum()) for n in bp.noise_layers(unrounded))
    assert rep.rounding_cost == pytest.approx((rep.params_kept - rep.params_kept_unrounded) / rep.params_total)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert _rel_err(m(x), small(x)) < TOL


def test_shrink_round_to_rounds_a_copy_and_matches_its_masked_output():
    m = _residual(seed=3)
    _random_masks(m, 0.7, seed=3)
    before = [n.mask.clone() for n in bp.noise_layers(m)]
    small = bp.shrink(m, round_to=8)
    assert all(torch.equal(b, n.mask) for b, n in zip(before, bp.noise_layers(m)))  # input untouched
    rounded = copy.deepcopy(m)
    round_masks(rounded, 8)
    ref = bp.shrink(rounded)
    assert _widths(small) == _widths(ref)
    assert bp.count_parameters(small) > bp.count_parameters(bp.shrink(m))
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert _rel_err(rounded(x), small(x)) < TOL


def test_round_to_never_keeps_more_than_a_layer_has_and_leaves_an_empty_layer_empty():
    m = _mlp()
    a, b = bp.noise_layers(m)
    a.mask[3:] = 0   # 3 of 20 kept -> 16 with k=16; 32 would be more than the layer has
    b.mask[:] = 0    # every structure of the 13 removed: stays so
    rep = round_masks(m, 16)
    assert [r.kept for r in rep.layers] == [16, 0]
    rep = round_masks(m, 32)
    assert [r.kept for r in rep.layers] == [20, 0]


def test_compression_target_then_rounding_reports_what_rounding_cost():
    m = _mlp(seed=2)
    plain = copy.deepcopy(m)
    rep0 = bp.prune(plain, "l2", compression=0.8)
    rep = bp.prune(m, "l2", compression=0.8, round_to=8)
    assert rep.params_kept_unrounded == rep0.params_kept == bp.count_parameters(bp.shrink(plain))
    assert rep.params_kept == bp.count_parameters(bp.shrink(m)) > rep0.params_kept
    assert rep.param_compression_unrounded == pytest.approx(rep0.param_compression)
    assert rep.rounding_cost == pytest.approx(rep0.param_compression - rep.param_compression)
    assert all(r.kept % 8 == 0 or r.kept == r.total for r in rep.layers)
    d = rep.to_dict()
    assert d["round_to"] == 8 and d["rounding_cost"] == pytest.approx(rep.rounding_cost)
    assert "round_to=8" in str(rep) and "without rounding" in str(rep)
    # the structures rounding added are the highest-scoring ones the target removed
    for n_plain, n_round, layer in zip(bp.noise_layers(plain), bp.noise_layers(m), (m[0], m[2])):
        added = (n_round.mask != 0) & (n_plain.mask == 0)
        left = (n_round.mask == 0)
        if added.any() and left.any():
            norms = layer.weight.norm(dim=1)
            assert norms[added].min() >= norms[left].max()


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_bad_round_to_is_refused_naming_it(bad):
    m = _mlp()
    with pytest.raises(ValueError, match="round_to"):
        bp.prune(m, "bmrs_n", round_to=bad)
    with pytest.raises(ValueError, match="round_to"):
        bp.shrink(m, round_to=bad)
    assert all(bool((n.mask == 1).all()) for n in bp.noise_layers(m))


def test_cli_and_run_config_pass_round_to_through(capsys):
    from bayesprune.experiments import cli
    from bayesprune.experiments.training import _prune, resolve_config

    cfg = resolve_config(round_to=4)
    assert cfg.round_to == 4
    m = _mlp()
    _plant_norms(m[0], torch.linspace(0.1, 3.0, 20))
    rep = _prune(m, resolve_config(method="l2", threshold=1.5, round_to=4), torch.randn(4, 6))
    assert rep.round_to == 4 and all(r.kept % 4 == 0 or r.kept == r.total for r in rep.layers)
    assert rep.layers[0].kept == 12  # 10 norms above 1.5, rounded up to 12
    with pytest.raises(ValueError, match="round_to"):
        resolve_config(method="none", round_to=8)
    assert cli.main(["run", "--round-to", "0"]) == 2
    assert "argument --round-to: must be a positive integer" in capsys.readouterr().err



def test_round_to_beside_head_noise_rounds_the_layers_and_leaves_the_heads():
    """With attention-head noise in the model, round_to rounds the other layers (fc1: 5 -> 8 kept)
    and leaves the heads to uniform_heads; the shrunk model equals the masked one."""
    from bayesprune import heads

    torch.manual_seed(4)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.att = nn.Linear(6, 16), nn.MultiheadAttention(16, 4, batch_first=True)
            self.fc1, self.fc2 = nn.Linear(16, 20), nn.Linear(20, 3)

        def forward(self, x):
            h = self.inp(x)
            h = h + self.att(h, h, h, need_weights=False)[0]
            return self.fc2(F.relu(self.fc1(h))).mean(1)

    model = Block().eval()
    x = torch.randn(2, 5, 6)
    bp.add_noise(model, x, layers=["fc1"])
    heads.add_head_noise(model, x)
    fc1 = next(n for n in bp.noise_layers(model) if n.layer_name == "fc1")
    fc1.mask[5:] = 0
    att = next(n for n in bp.noise_layers(model) if isinstance(n, heads.HeadNoise))
    att.mask[1] = 0
    rep = round_masks(model, 8)
    assert int(fc1.mask.sum()) == 8 and att.mask.tolist() == [1, 0, 1, 1]
    assert rep.params_kept > rep.params_kept_unrounded
    small = bp.shrink(model, x)
    x2 = torch.randn(3, 5, 6)
    with torch.no_grad():
        ref = model(x2)
        assert float((small(x2) - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    assert small.fc1.out_features == 8
