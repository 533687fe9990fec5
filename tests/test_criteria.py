"""Pruning criteria, target mode and the report.

Parameter counts are checked against independent hand counts on plain sequential networks (an
MLP and a small LeNet-like conv net, including the conv -> flatten -> linear expansion), and the
criteria are run end to end on a mixed model (residual block, BatchNorm, conv -> linear,
self-attention over [batch, tokens, features]).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayesprune
from bayesprune import CRITERIA, add_noise, kl, noise_layers, prune, scores
from bayesprune.reduction import REFERENCE_THRESHOLD


# ---------------------------------------------------------------------------------------------
# models (the mixed model is shared with tests/test_noise.py, in tests/mixed_model.py)


from mixed_model import Attention, Net, ResBlock  # noqa: E402,F401


class TokenViewNet(nn.Module):
    """A Linear whose 32 outputs are viewed as 4 tokens x 8 features, then a residual block on
    the tokens (as in a ViT patch embedding): feature j of `embed` is feature j % 8 of the tokens."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(12, 32)
        self.attn = Attention(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.attn(self.embed(x).view(-1, 4, 8)).mean(1))


def make_net(seed=0):
    torch.manual_seed(seed)
    model = Net()
    x = (torch.randn(6, 3, 8, 8), torch.randn(6, Net.T, Net.D))
    add_noise(model, x)
    return model, x, torch.randint(0, 5, (6,))


def lenet_like():
    """[B,1,8,8]: Conv(1,3,3) 8->6, Conv(3,4,3) 6->4, flatten 4*4*4=64, FC 10, FC 6, FC 3."""
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(),
        nn.Conv2d(3, 4, 3), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 10), nn.ReLU(),
        nn.Linear(10, 6), nn.ReLU(),
        nn.Linear(6, 3),
    )  # fmt: skip


def lenet_hand_count(k1, k2, k3, k4):
    """Parameters left with k1/k2 conv channels and k3/k4 hidden units kept (weights + biases,
    into and out of every structure; a conv2 channel feeds 4*4 = 16 inputs of the first FC)."""
    return (
        k1 * (1 * 9 + 1)  # conv1
        + k2 * (k1 * 9 + 1)  # conv2
        + k3 * (k2 * 16 + 1)  # fc1 after flatten
        + k4 * (k3 + 1)  # fc2
        + 3 * (k4 + 1)  # output layer
    )


def mlp():
    return nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def mlp_hand_count(k1, k2, k3):
    return k1 * (7 + 1) + k2 * (k1 + 1) + k3 * (k2 + 1) + 2 * (k3 + 1)


def set_masks(model, removed: dict[int, list[int]]):
    for i, n in enumerate(noise_layers(model)):
        n.mask.fill_(1)
        for j in removed.get(i, []):
            n.mask[j] = 0


# ---------------------------------------------------------------------------------------------
# parameter counts against hand counts


@pytest.mark.parametrize(
    "removed",
    [
        {},
        {0: [0]},
        {1: [1, 3]},
        {0: [2], 1: [0], 2: [2, 5, 9], 3: [0]},
        {0: [0, 1], 1: [0, 1, 2], 2: list(range(9)), 3: list(range(5))},
    ],
)
def test_report_params_match_hand_count_lenet_like(removed):
    torch.manual_seed(0)
    model = lenet_like()
    x = torch.randn(2, 1, 8, 8)
    add_noise(model, x)
    assert [n.layer_name for n in noise_layers(model)] == ["0", "2", "5", "7"]
    set_masks(model, removed)
    rep = bayesprune.report(model)
    totals = [3, 4, 10, 6]
    kept = [t - len(removed.get(i, [])) for i, t in enumerate(totals)]
    assert rep.params_total == lenet_hand_count(*totals) == 879
    assert rep.params_kept == lenet_hand_count(*kept)
    assert [(r.layer, r.kept, r.total) for r in rep.layers] == list(zip(["0", "2", "5", "7"], kept, totals))
    assert rep.structures_total == 23 and rep.structures_kept == sum(kept)
    assert rep.structure_compression == pytest.approx(1 - sum(kept) / 23)
    assert rep.param_compression == pytest.approx(1 - lenet_hand_count(*kept) / 879)
    d = rep.to_dict()
    assert d["params_kept"] == rep.params_kept and d["param_compression"] == rep.param_compression
    assert "parameters removed" in str(rep)


@pytest.mark.parametrize("removed", [{0: [0, 8]}, {1: [4]}, {0: [1], 1: [0, 2], 2: [3]}])
def test_report_params_match_hand_count_mlp(removed):
    torch.manual_seed(0)
    model = mlp()
    add_noise(model, torch.randn(3, 7))
    set_masks(model, removed)
    totals = [9, 5, 4]
    kept = [t - len(removed.get(i, [])) for i, t in enumerate(totals)]
    rep = bayesprune.report(model)
    assert (rep.params_kept, rep.params_total) == (mlp_hand_count(*kept), mlp_hand_count(*totals))
    assert sum(p.numel() for p in model.parameters() if p is not None) - rep.params_total == 2 * sum(totals)  # noise mu, log_sigma


@pytest.mark.parametrize(
    "removed,expect",
    [
        ({"block.conv1": [3]}, 8 * 9 + 2 + 8 * 9),  # conv1 row (no bias), bn1 weight+bias, conv2 column
        ({"fc": [5]}, 64 + 1 + 5),  # fc row + bias, one head column (through the concat)
        ({"fc": [5, 20]}, 2 * (64 + 1 + 5)),
        ({"attn.fc1": [7]}, 8 + 1 + 8),  # fc1 row + bias, fc2 column
        ({"stem": [2]}, 0),  # tied to block.conv2 by the identity add: stays unless both go
        ({"stem": [2], "block.conv2": [2]}, (3 * 9 + 1) + 2 + 8 * 9 + 2 + 8 * 9 + 4),
        ({"attn.out": [1], "attn.fc2": [1]}, 0),  # tied to the token input by the residual adds
        ({"conv3": [1]}, 8 + 1 + 16 * 32),  # conv3 row + bias, its 16 columns of fc (through flatten)
    ],
)
def test_report_params_match_hand_count_mixed_model(removed, expect):
    model, x, _ = make_net()
    by_name = {n.layer_name: n for n in noise_layers(model)}
    for name, idxs in removed.items():
        by_name[name].mask[idxs] = 0
    rep = bayesprune.report(model)
    assert rep.params_total == bayesprune.count_parameters(model)
    assert rep.params_total - rep.params_kept == expect
    # the physically shrunk model agrees with the count and still runs
    small = bayesprune.shrink(model)
    assert bayesprune.count_parameters(small) == rep.params_kept
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(*x), model.eval()(*x), rtol=1e-4, atol=1e-5)


def test_report_linear_viewed_as_tokens():
    torch.manual_seed(0)
    model = TokenViewNet()
    add_noise(model, torch.randn(2, 12))
    noise_layers(model)[0].mask[18] = 0
    rep = bayesprune.report(model)
    assert rep.params_kept == rep.params_total


# ---------------------------------------------------------------------------------------------
# every criterion on the mixed model


def _train(model, x, y, weighting, steps=3):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(*x), y) + kl(model, weighting, num_train=1000)
        loss.backward()
        opt.step()
    return loss


def _check_report(model, rep, criterion):
    layers = noise_layers(model)
    assert rep.criterion == criterion
    assert [r.layer for r in rep.layers] == [n.layer_name for n in layers]
    for r, n in zip(rep.layers, layers):
        assert r.total == n.num_structures
        assert r.kept == int((n.mask != 0).sum())
        assert set(n.mask.unique().tolist()) <= {0.0, 1.0}
    assert rep.structures_total == sum(n.num_structures for n in layers)
    assert rep.structures_kept == sum(int(n.mask.sum()) for n in layers)
    assert rep.params_total == bayesprune.count_parameters(model)
    assert 0 <= rep.params_kept <= rep.params_total
    if rep.structures_kept == rep.structures_total:
        assert rep.params_kept == rep.params_total


@pytest.mark.parametrize("weighting", ["mean"])  # 'elbo' training: tests/test_noise.py
def test_every_criterion_runs_after_training(weighting):
    """Threshold criteria after a few Adam steps (l2/grad target mode: see the next tests)."""
    model, x, y = make_net()
    loss = _train(model, x, y, weighting)
    assert math.isfinite(loss.item())
    runs = [("bmrs_n", {}), ("bmrs_u", {"precision": 4}), ("bmrs_u", {"precision": 8}), ("snr", {}), ("etheta", {})]
    for crit, opts in runs:
        rep = prune(model, crit, monotone=False, **opts)
        _check_report(model, rep, crit)
        model.eval()
        with torch.no_grad():
            out = model(*x)
        assert out.shape == (6, 5) and bool(torch.isfinite(out).all())


# (mu, log sigma) of structures 0..4 of every layer; the rest stay at init (mu 0, sigma e^-5)
POSTERIORS = [
    (-18.0, 1.0),  # piled at the lower bound, wide
    (-4.0, math.log(0.5)),  # inside BMRS_U-4's [log 2^-23, log 2^-4], above BMRS_U-8's upper bound
    (-10.0, math.log(0.5)),  # inside both BMRS_U intervals, far from the BMRS_N spike
    (-19.5, math.log(0.3)),  # the reference implementation's NaN-SNR case: SNR 3.49, E 3.64e-9
    (-3.0, 1.0),  # wide: SNR < 1 with E[theta] > 0.1
]


def expected_decisions(mu, sigma, a=-20.0, b=0.0):
    """Independent float64 values (scipy) of the docs/maths.md formulas: dF_N (s -> 0), dF_U-4, dF_U-8,
    SNR, E[theta]."""
    from scipy.special import ndtr
    from scipy.stats import norm

    al, be = (a - mu) / sigma, (b - mu) / sigma
    z = ndtr(be) - ndtr(al)
    df_n = math.log(b - a) + norm.logpdf(a, mu, sigma) - math.log(z)

    def df_u(p):
        ap, bp = math.log(2.0**-23), math.log(2.0**-p)
        q = (ndtr((bp - mu) / sigma) - ndtr((ap - mu) / sigma)) / z
        return (math.log(q) if q > 0 else -math.inf) - math.log((bp - ap) / (b - a))

    e1 = math.exp(mu + sigma**2 / 2) * (ndtr(be - sigma) - ndtr(al - sigma)) / z
    e2 = math.exp(2 * mu + 2 * sigma**2) * (ndtr(be - 2 * sigma) - ndtr(al - 2 * sigma)) / z
    return {"bmrs_n": df_n, ("bmrs_u", 4): df_u(4), ("bmrs_u", 8): df_u(8), "snr": e1 / math.sqrt(e2 - e1 * e1), "etheta": e1}


def test_bayesian_criteria_prune_the_right_structures():
    model, x, _ = make_net()
    layers = noise_layers(model)
    chosen = ("block.conv1", "fc", "attn.q", "attn.fc1")  # conv, linear, [B,T,F]; the rest stay at init
    with torch.no_grad():
        for n in layers:
            if n.layer_name in chosen:
                for j, (m, ls) in enumerate(POSTERIORS):
                    n.mu[j], n.log_sigma[j] = m, ls
    vals = [expected_decisions(m, math.exp(ls)) for m, ls in POSTERIORS]
    rules = {
        ("bmrs_n", 8): lambda v: v["bmrs_n"] >= 0,  # the exact rule, prior odds 1
        ("bmrs_n", "default"): lambda v: v["bmrs_n"] >= REFERENCE_THRESHOLD,  # odds sqrt(2 pi)
        ("bmrs_u", 4): lambda v: v[("bmrs_u", 4)] >= 0,
        ("bmrs_u", 8): lambda v: v[("bmrs_u", 8)] >= 0,
        ("snr", 8): lambda v: v["snr"] <= 1,
        ("etheta", 8): lambda v: v["etheta"] <= 0.1,
    }
    # away from every decision boundary, so the test checks the rule and not rounding
    for v in vals:
        assert min(abs(v["bmrs_n"]), abs(v["bmrs_n"] - REFERENCE_THRESHOLD), abs(v[("bmrs_u", 4)]),
                   abs(v[("bmrs_u", 8)]), abs(v["snr"] - 1)) > 0.05
        assert abs(v["etheta"] - 0.1) > 0.01
    expect = {key: [j for j, v in enumerate(vals) if rule(v)] for key, rule in rules.items()}
    assert expect == {
        ("bmrs_n", 8): [0, 3],
        ("bmrs_n", "default"): [0, 3],
        ("bmrs_u", 4): [1, 2],
        ("bmrs_u", 8): [2],
        ("snr", 8): [0, 4],
        ("etheta", 8): [0, 1, 2, 3],
    }
    for (crit, p), want in expect.items():
        opts = {"precision": p} if crit == "bmrs_u" else {"prior_odds": 1} if (crit, p) == ("bmrs_n", 8) else {}
        rep = prune(model, crit, monotone=False, **opts)
        for n in layers:
            got = torch.nonzero(n.mask == 0).flatten().tolist()
            assert got == (want if n.layer_name in chosen else []), (crit, p, n.layer_name)
        _check_report(model, rep, crit)
    # scores are float64, one tensor per layer, higher = keep; -dF_N against the scipy value
    sc = scores(model, "bmrs_n")
    assert [t.shape[0] for t in sc] == [n.num_structures for n in layers]
    assert all(t.dtype == torch.float64 for t in sc)
    li = [n.layer_name for n in layers].index("fc")
    for j, v in enumerate(vals):
        assert -sc[li][j].item() == pytest.approx(v["bmrs_n"], rel=1e-4, abs=1e-3)
        assert scores(model, "snr")[li][j].item() == pytest.approx(v["snr"], rel=1e-4)
    # thresholds move the rule
    prune(model, "etheta", threshold=0.0, monotone=False)
    assert all(bool((n.mask == 1).all()) for n in layers)
    prune(model, "bmrs_n", threshold=-40.0, monotone=False)  # now also structure 4 (dF_N -18.3)
    assert all(torch.nonzero(n.mask == 0).flatten().tolist() == ([0, 3, 4] if n.layer_name in chosen else []) for n in layers)


@pytest.mark.parametrize("criterion,net", [("l2", "mixed"), ("l2", "lenet_like"), ("grad", "lenet_like")])
def test_target_mode_reaches_and_is_minimal(criterion, net):
    if net == "mixed":
        model, x, y = make_net()
    else:
        torch.manual_seed(0)
        model, x, y = lenet_like(), (torch.randn(4, 1, 8, 8),), torch.randint(0, 3, (4,))
        add_noise(model, x)
    _train(model, x, y, "mean", steps=2)
    if criterion == "grad":
        model.zero_grad()
        F.cross_entropy(model(*x), y).backward()
    target = 0.5
    rep = prune(model, criterion, compression=target)
    model.eval()
    with torch.no_grad():
        assert bool(torch.isfinite(model(*x)).all())
    _check_report(model, rep, criterion)
    assert rep.param_compression >= target
    layers = noise_layers(model)
    sc = torch.cat(scores(model, criterion))
    mask = torch.cat([n.mask for n in layers])
    removed, kept = sc[mask == 0], sc[mask == 1]
    # lowest scores removed first, over all layers
    assert removed.max() <= kept.min()
    # minimal: giving back the last structure removed (highest score among removed) stays below
    last = int(torch.nonzero((mask == 0) & (sc == removed.max())).flatten()[0])
    sizes = [n.num_structures for n in layers]
    li = max(i for i in range(len(sizes)) if sum(sizes[:i]) <= last)
    layers[li].mask[last - sum(sizes[:li])] = 1
    assert bayesprune.report(model).param_compression < target


def test_target_mode_exact_on_mlp_hand_count():
    """l2 target mode on the MLP: the smallest k (in score order) whose hand count reaches 40 %."""
    torch.manual_seed(1)
    model = mlp()
    add_noise(model, torch.randn(3, 7))
    layers = noise_layers(model)
    sc = torch.cat(scores(model, "l2"))
    order = torch.argsort(sc, stable=True).tolist()
    sizes = [9, 5, 4]
    total = mlp_hand_count(*sizes)

    def share(k):
        kept = list(sizes)
        for idx in order[:k]:
            li = 0 if idx < 9 else 1 if idx < 14 else 2
            kept[li] -= 1
        if min(kept) == 0:  # an emptied layer keeps one zeroed unit (Torch-Pruning cannot empty it)
            kept = [max(v, 1) for v in kept]
        return 1 - mlp_hand_count(*kept) / total

    k = next(k for k in range(len(order) + 1) if share(k) >= 0.4)
    rep = prune(model, "l2", compression=0.4)
    assert rep.structures_total - rep.structures_kept == k
    assert rep.param_compression == pytest.approx(share(k))
    assert rep.param_compression >= 0.4 > share(k - 1)
    assert sorted(torch.nonzero(torch.cat([n.mask for n in layers]) == 0).flatten().tolist()) == sorted(order[:k])


def test_target_mode_monotone_keeps_earlier_removals():
    torch.manual_seed(0)
    model = mlp()
    add_noise(model, torch.randn(3, 7))
    layers = noise_layers(model)
    top = torch.argsort(scores(model, "l2")[0], descending=True)[:3]
    layers[0].mask[top] = 0  # removed earlier: the three largest norms of the first layer
    rep = prune(model, "l2", compression=0.3)
    assert bool((layers[0].mask[top] == 0).all())
    assert rep.param_compression >= 0.3
    rep0 = prune(model, "l2", compression=0.0, monotone=False)
    assert rep0.structures_kept == rep0.structures_total


# ---------------------------------------------------------------------------------------------
# errors


def test_error_unknown_criterion_lists_valid_ones():
    model, _, _ = make_net()
    with pytest.raises(ValueError) as err:
        prune(model, "magnitude")
    assert "'magnitude'" in str(err.value) and all(c in str(err.value) for c in CRITERIA)
    with pytest.raises(ValueError, match="valid: bmrs_n"):
        scores(model, "nope")


@pytest.mark.parametrize("p", [0, -4, 0.0])
def test_error_bmrs_u_precision(p):
    model, _, _ = make_net()
    with pytest.raises(ValueError, match="precision"):
        prune(model, "bmrs_u", precision=p)


@pytest.mark.parametrize("criterion", ["l2", "grad"])
def test_error_l2_grad_need_compression_or_threshold(criterion):
    model, x, y = make_net()
    F.cross_entropy(model(*x), y).backward()
    with pytest.raises(ValueError, match="compression= or threshold="):
        prune(model, criterion)
    prune(model, criterion, threshold=0.0)  # a threshold is enough


def test_error_other_prune_arguments():
    model, _, _ = make_net()
    with pytest.raises(ValueError, match="either threshold or compression"):
        prune(model, "l2", threshold=1.0, compression=0.5)
    for c in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            prune(model, "l2", compression=c)
    with pytest.raises(ValueError, match="needs gradients.*'stem'"):
        prune(model, "grad", compression=0.5)
    with pytest.raises(ValueError, match="no noise layers"):
        prune(nn.Sequential(nn.Linear(2, 2)), "bmrs_n")


@pytest.mark.parametrize("criterion", ["bmrs_n", "bmrs_u", "snr", "etheta"])
def test_error_nan_parameters_in_prune(criterion):
    model, _, _ = make_net()
    with torch.no_grad():
        noise_layers(model)[5].mu[2] = float("nan")
    with pytest.raises(FloatingPointError, match="'attn.q'"):
        prune(model, criterion)
    with torch.no_grad():
        noise_layers(model)[5].mu[2] = 0.0
        noise_layers(model)[6].log_sigma[0] = float("inf")
    with pytest.raises(FloatingPointError, match="'attn.k'.*log_sigma"):
        prune(model, criterion)


# ---------------------------------------------------------------------------------------------
# the example input kept by add_noise; prune changes nothing when it raises


def _planted_net(seed=0):
    """The mixed net with the POSTERIORS planted in four layers (nontrivial masks for every rule)."""
    model, x, y = make_net(seed)
    with torch.no_grad():
        for n in noise_layers(model):
            if n.layer_name in ("block.conv1", "fc", "attn.q", "attn.fc1"):
                for j, (m, ls) in enumerate(POSTERIORS):
                    n.mu[j], n.log_sigma[j] = m, ls
    return model, x, y


def _masks(model):
    return [n.mask.clone() for n in noise_layers(model)]


def test_prune_report_shrink_use_the_input_given_to_add_noise():
    model, x, _ = _planted_net()
    rep = prune(model, "etheta")  # no example input passed anywhere below
    assert rep.structures_kept < rep.structures_total
    again = bayesprune.report(model)
    explicit = bayesprune.report(model, example_inputs=tuple(t[:2] for t in x))
    assert again.params_kept == rep.params_kept == explicit.params_kept < rep.params_total
    assert bayesprune.remaining_parameters(model) == rep.params_kept
    small = bayesprune.shrink(model)
    assert bayesprune.count_parameters(small) == rep.params_kept
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(small.eval()(*x), model(*x), rtol=1e-4, atol=1e-5)
    trainable = bayesprune.shrink_for_training(model)
    assert bayesprune.stored_example_inputs(trainable) is bayesprune.stored_example_inputs(model)
    assert bayesprune.report(trainable).params_kept == rep.params_kept  # and it keeps working


def test_prune_that_raises_leaves_every_mask_unchanged(monkeypatch):
    model, _, _ = _planted_net()
    layers = noise_layers(model)
    prune(model, "etheta")  # some structures removed already
    before = _masks(model)
    assert any(bool((m == 0).any()) for m in before)
    with torch.no_grad():
        layers[-1].mu[0] = float("nan")  # the last layer: the earlier ones are scored first
    for crit, opts in (("bmrs_n", {}), ("snr", {}), ("bmrs_u", {"precision": 4})):
        with pytest.raises(FloatingPointError, match=repr(layers[-1].layer_name)):
            prune(model, crit, monotone=False, **opts)  # would revive and remove structures
        assert all(torch.equal(a, b) for a, b in zip(before, _masks(model))), crit
    with torch.no_grad():
        layers[-1].mu[0] = 0.0
    # a failure after the masks were set (here: counting the parameters) restores them too
    import bayesprune.pruning as pruning

    calls = {"n": 0}

    def failing_version(real):
        def failing(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("counting failed")
            return real(*a, **k)
        return failing

    # the compression search counts with the fast estimate, then with the shrunk network
    monkeypatch.setattr(pruning, "remaining_parameters", failing_version(pruning.remaining_parameters))
    monkeypatch.setattr(pruning, "_estimated_remaining", failing_version(pruning._estimated_remaining))
    for kwargs in ({"compression": 0.6}, {}):
        calls["n"] = 0 if kwargs else 2
        with pytest.raises(RuntimeError, match="counting failed"):
            prune(model, "l2" if kwargs else "bmrs_n", monotone=False, **kwargs)
        assert all(torch.equal(a, b) for a, b in zip(before, _masks(model))), kwargs


def test_names_options_and_objects_give_identical_masks():
    results = {}
    variants = {
        "name": ("bmrs_u", {}),
        "object": (bayesprune.BMRSUniform(precision=8), {}),
        "name+option": ("bmrs_u", {"precision": 8}),
        "p4 name": ("bmrs_u", {"precision": 4}),
        "p4 object": (bayesprune.BMRSUniform(precision=4), {}),
        "n name": ("bmrs_n", {}),
        "n object": (bayesprune.BMRSNormal(), {}),
        "n reference": ("bmrs_n", {"threshold": "reference"}),
        "n reference number": ("bmrs_n", {"threshold": REFERENCE_THRESHOLD}),
        "n odds": (bayesprune.BMRSNormal(prior_odds=math.sqrt(2 * math.pi)), {}),
    }
    for key, (crit, opts) in variants.items():
        model, _, _ = _planted_net()
        rep = prune(model, crit, **opts)
        results[key] = (_masks(model), rep.criterion, rep.rule)
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(results[a][0], results[b][0]))  # noqa: E731
    assert same("name", "object") and same("name", "name+option")
    assert same("p4 name", "p4 object") and not same("name", "p4 name")  # p = 4 removes more
    assert all(same("n name", k) for k in ("n object", "n reference", "n reference number", "n odds"))
    assert results["name"][1] == "bmrs_u" and results["n object"][1] == "bmrs_n"
    assert results["name"][2] == "BMRS_U-8: dF + log(prior odds 1) >= 0 (dF >= 0)"
    assert results["n name"][2] == "BMRS_N: dF + log(prior odds 2.507) >= 0 (dF >= -0.9189)"
    assert bayesprune.get_criterion("bmrs_u", precision=4) == bayesprune.BMRSUniform(precision=4)


def test_registry_maps_every_cli_name_to_its_class():
    classes = {"bmrs_n": bayesprune.BMRSNormal, "bmrs_u": bayesprune.BMRSUniform, "snr": bayesprune.SNR,
               "etheta": bayesprune.ExpectedTheta, "l2": bayesprune.L2Norm, "grad": bayesprune.GradNorm}
    assert CRITERIA == tuple(classes)
    for name, cls in classes.items():
        c = bayesprune.get_criterion(name)
        assert type(c) is cls and c.name == name and c.threshold_meaning and c.rule
    assert bayesprune.SNR().threshold == 1.0 and bayesprune.ExpectedTheta().threshold == 0.1
    assert bayesprune.L2Norm().threshold is None and "no default rule" in bayesprune.GradNorm().rule
    assert bayesprune.BMRSUniform().threshold == 0.0 and bayesprune.BMRSUniform().prior_odds == 1.0


def test_unknown_and_misplaced_options_are_refused_naming_them():
    model, _, _ = make_net()
    before = _masks(model)
    with pytest.raises(ValueError, match=r"'snr' \(SNR\) has no option 'precision'; its options: threshold"):
        prune(model, "snr", precision=4)
    with pytest.raises(ValueError, match="has no option 'p'.*precision"):
        prune(model, "bmrs_u", p=4)
    with pytest.raises(ValueError, match="go to the criterion object"):
        prune(model, bayesprune.SNR(), threshold=2.0)
    with pytest.raises(ValueError, match="prior_odds or threshold, not both"):
        prune(model, "bmrs_n", prior_odds=2.0, threshold=-1.0)
    with pytest.raises(ValueError, match="either threshold or compression"):
        prune(model, "bmrs_n", prior_odds=2.0, compression=0.5)
    assert all(torch.equal(a, b) for a, b in zip(before, _masks(model)))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_thresholds_precisions_compressions_are_refused(bad):
    model, _, _ = make_net()
    before = _masks(model)
    cases = [
        ("threshold", "bmrs_n", {"threshold": bad}),
        ("threshold", "snr", {"threshold": bad}),
        ("threshold", "etheta", {"threshold": bad}),
        ("threshold", "l2", {"threshold": bad}),
        ("precision", "bmrs_u", {"precision": bad}),
        ("prior_odds", "bmrs_u", {"prior_odds": bad}),
        ("compression", "l2", {"compression": bad}),
    ]
    for option, crit, kwargs in cases:
        with pytest.raises(ValueError, match=f"^{option} must be a finite number"):
            prune(model, crit, **kwargs)
    with pytest.raises(ValueError, match="threshold must be a finite number or 'reference'"):
        bayesprune.BMRSNormal(threshold="paper")
    for odds in (0.0, -1.0):
        with pytest.raises(ValueError, match="prior_odds must be > 0"):
            bayesprune.BMRSNormal(prior_odds=odds)
    assert all(torch.equal(a, b) for a, b in zip(before, _masks(model)))


# ---------------------------------------------------------------------------------------------
# prior odds against a direct computation of the posterior odds of removal


@functools.lru_cache(maxsize=None)
def _bayes_factor(mu, sigma, kind, p=8, a=-20.0, b=0.0, s=1e-6):
    """BF = E_q[p~ / p] integrated numerically (mpmath, 20 digits):
    q = N(mu, sigma^2) on [a, b], p = U(a, b) in log space, p~ = N(a, s^2) on [a, b] (BMRS_N)
    or U(log 2^-23, log 2^-p) (BMRS_U)."""
    import mpmath as mp

    from quadrature import mp_mass

    mp.mp.dps = 20
    mu, sigma, a, b = mp.mpf(mu), mp.mpf(sigma), mp.mpf(a), mp.mpf(b)
    z = mp_mass((a - mu) / sigma, (b - mu) / sigma)
    q = lambda x: mp.npdf(x, mu, sigma) / z  # noqa: E731
    if kind == "bmrs_n":
        s = mp.mpf(s)
        spike = lambda x: mp.npdf(x, a, s) / mp.mpf(0.5)  # noqa: E731  (half of it lies in [a, b])
        bf = (b - a) * mp.quad(lambda x: q(x) * spike(x), [a, a + s, a + 4 * s, a + 12 * s, a + 40 * s])
    else:
        lo, hi = mp.log(mp.mpf(2) ** -23), mp.log(mp.mpf(2) ** -p)
        bf = (b - a) / (hi - lo) * mp.quad(q, [lo, mu, hi] if lo < mu < hi else [lo, hi])
    return float(bf)


def test_prior_odds_rule_against_direct_posterior_odds():
    """Removed exactly when the posterior odds of removal BF x prior odds >= 1: odds 1 is the
    threshold 0, odds sqrt(2 pi) the reference's decisions (dF_N >= -0.919), on a grid."""
    mus = [-20.5, -19.9, -19.0, -17.0, -14.0, -10.0, -6.0, -3.0, -1.0, 0.0, 0.5]
    sigmas = [0.05, 0.3, 1.0, 3.0, 10.0, 20.0, 60.0]
    grid = [(m, s) for m in mus for s in sigmas]
    mu = torch.tensor([m for m, _ in grid], dtype=torch.float64)
    log_sigma = torch.tensor([math.log(s) for _, s in grid], dtype=torch.float64)
    noise = bayesprune.MultiplicativeNoise(len(grid), dim=-1).double()
    with torch.no_grad():
        noise.mu.copy_(mu)
        noise.log_sigma.copy_(log_sigma)
    sqrt_2pi = math.sqrt(2 * math.pi)
    checks = [
        ("bmrs_n", bayesprune.BMRSNormal(prior_odds=1), 1.0),
        ("bmrs_n", bayesprune.BMRSNormal(threshold=0.0), 1.0),
        ("bmrs_n", bayesprune.BMRSNormal(), sqrt_2pi),
        ("bmrs_n", bayesprune.BMRSNormal(threshold="reference"), sqrt_2pi),
        ("bmrs_n", bayesprune.BMRSNormal(prior_odds=10.0), 10.0),
        ("bmrs_u", bayesprune.BMRSUniform(precision=8), 1.0),
        ("bmrs_u", bayesprune.BMRSUniform(precision=4, prior_odds=0.1), 0.1),
    ]
    counted = {}
    for kind, crit, odds in checks:
        kept = crit.keep(crit.score(None, noise)).tolist()
        # the posterior odds of removal, BF x prior odds
        direct = [_bayes_factor(m, s, kind, getattr(crit, "precision", 8)) * odds for m, s in grid]
        decided = [(k, o) for k, o in zip(kept, direct) if o == 0 or abs(math.log(o)) > 1e-6]  # no ties
        assert len(decided) >= len(grid) - 1
        assert all(k == (o < 1) for k, o in decided), [(g, o) for g, k, o in zip(grid, kept, direct) if k != (o < 1)]
        counted[(kind, odds)] = sum(not k for k in kept)
    # the rules differ on this grid: odds sqrt(2 pi) removes more than odds 1, fewer than odds 10
    assert counted[("bmrs_n", 1.0)] < counted[("bmrs_n", sqrt_2pi)] < counted[("bmrs_n", 10.0)]
    # odds sqrt(2 pi) is the reference's rule: its dF_N (ours + 0.5 log 2 pi, the 2 pi left out) >= 0
    df = -bayesprune.BMRSNormal().score(None, noise)
    ref_removed = (df + 0.5 * math.log(2 * math.pi) >= 0).tolist()
    assert [not k for k in bayesprune.BMRSNormal().keep(-df).tolist()] == ref_removed


def _df_n_scipy(mu, sigma, a=-20.0, b=0.0):
    from scipy.special import ndtr
    from scipy.stats import norm

    return math.log(b - a) + norm.logpdf(a, mu, sigma) - math.log(ndtr((b - mu) / sigma) - ndtr((a - mu) / sigma))


def test_default_bmrs_n_removes_posteriors_at_the_prior_and_keeps_what_the_data_need():
    """A posterior relaxed to the prior (wide, centred: q close to U(a, b)) has dF_N between
    -0.35 and -0.08: no evidence either way.  Exact BMR (odds 1) keeps it; the default odds
    sqrt(2 pi) remove it.  Structures the data need (mu near 0, small sigma) stay under both."""
    model, _, _ = make_net()
    layer = next(n for n in noise_layers(model) if n.layer_name == "fc")
    at_prior = [(-10.0, 10.0), (-10.0, 14.0), (-9.0, 20.0), (-11.0, 12.0)]
    needed = [(0.0, 0.05), (-0.5, 0.2), (-1.0, 0.5)]
    with torch.no_grad():
        for j, (m, s) in enumerate(at_prior + needed):
            layer.mu[j], layer.log_sigma[j] = m, math.log(s)
    for m, s in at_prior:
        assert -0.35 <= _df_n_scipy(m, s) <= -0.08, (m, s, _df_n_scipy(m, s))
        q = bayesprune.TruncatedLogNormal(torch.tensor(m), torch.tensor(s))
        assert float(kl_to_prior(q)) < 0.2  # the posterior carries almost no information
    for m, s in needed:
        assert _df_n_scipy(m, s) < -5
    rep = prune(model, "bmrs_n")
    removed = torch.nonzero(layer.mask == 0).flatten().tolist()
    assert removed == list(range(len(at_prior)))
    assert all(bool((n.mask == 1).all()) for n in noise_layers(model) if n is not layer)
    assert rep.structures_total - rep.structures_kept == len(at_prior)
    prune(model, "bmrs_n", prior_odds=1, monotone=False)
    assert bool((layer.mask == 1).all())


def kl_to_prior(q):
    return torch.distributions.kl_divergence(q, bayesprune.LogUniform(batch_shape=q.batch_shape))


def test_harness_default_rule_is_the_criterion_default():
    """`bayesprune run`'s resolved configuration writes out BMRS_N's default, the paper's odds."""
    from bayesprune.experiments.training import criterion_of, resolve_config

    cfg = resolve_config()
    assert cfg.method == "bmrs_n" and cfg.threshold == bayesprune.BMRSNormal().threshold == REFERENCE_THRESHOLD
    assert criterion_of(cfg) == bayesprune.BMRSNormal()
    exact = resolve_config(prior_odds=1.0)
    assert exact.threshold is None and criterion_of(exact) == bayesprune.BMRSNormal(prior_odds=1)
    assert resolve_config(method="bmrs_u").threshold is None  # BMRS_U's default is odds 1
    for option in ("threshold", "prior_odds", "precision", "compression"):
        with pytest.raises(ValueError, match=option):
            resolve_config(method="bmrs_u" if option == "precision" else "l2" if option == "compression" else "bmrs_n",
                           **{option: float("nan")})
