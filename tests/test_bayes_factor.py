import math
from types import SimpleNamespace

import json
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from bayesprune.experiments.bf_training import train_bayes_factor
from bayesprune.bayes_factor import (
    BayesFactorPruner,
    WeightMasks,
    count_dead_structures,
    fixed_batches,
    log_posterior,
    magnitude_prune,
    prunable_weights,
    random_prune,
    shrink_dead,

)


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 16),
        nn.ReLU(),
        nn.Linear(16, 3),
    )


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 1).long()
    return x, y


def batches(n=96, bs=32):
    x, y = data(n)
    return [(x[i : i + bs], y[i : i + bs]) for i in range(0, n, bs)]


def direct_log_posterior(model, bs, m0, s0):
    """Independent computation with plain loops (float64, per example)."""
    model.eval()
    ll = 0.0
    with torch.no_grad():
        for x, y in bs:
            logits = model(x).double()
            for i in range(x.shape[0]):
                z = logits[i]
                ll += float(z[y[i]] - torch.log(torch.exp(z - z.max()).sum()) - z.max())
        lp = 0.0
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                w = m.weight.double().flatten()
                lp += float(
                    (-0.5 * math.log(2 * math.pi) - math.log(s0) - 0.5 * ((w - m0) / s0) ** 2).sum()
                )
    return ll + lp


@pytest.mark.parametrize("mode", ["random", "magnitude"])
def test_log_bf_matches_direct_computation(mode):
    model = conv_net()
    bs = batches()
    m0, s0 = 0.1, 0.5
    before_direct = direct_log_posterior(model, bs, m0, s0)
    assert log_posterior(model, bs, m0, s0) == pytest.approx(before_direct, rel=1e-9, abs=1e-6)
    pruner = BayesFactorPruner(model, mode=mode, sparsity=0.6, prior_mean=m0, prior_std=s0, likelihood_data=bs)
    rec = pruner.end_of_epoch(1)
    after_direct = direct_log_posterior(model, bs, m0, s0)
    assert rec["pruned"]
    assert rec["log_posterior_before"] == pytest.approx(before_direct, rel=1e-9, abs=1e-6)
    assert rec["log_posterior_after"] == pytest.approx(after_direct, rel=1e-9, abs=1e-6)
    assert rec["log_bf"] == pytest.approx(after_direct - before_direct, rel=1e-7, abs=1e-6)
    assert pruner.log_bf == rec["log_bf"]


def test_log_posterior_accepts_dataset_and_restores_mode():
    model = conv_net()
    x, y = data()
    model.train()
    a = log_posterior(model, TensorDataset(x, y))
    assert model.training
    assert a == pytest.approx(log_posterior(model, (x, y)), rel=1e-12)


@pytest.mark.parametrize("prune_fn", ["random", "magnitude"])
@pytest.mark.parametrize("r", [0.0, 0.25, 0.5, 0.9, 0.99])
def test_per_layer_sparsity_is_r(prune_fn, r):
    model = conv_net()
    masks = WeightMasks(model)
    g = torch.Generator().manual_seed(0)
    fn = (lambda m, r: random_prune(m, r, g)) if prune_fn == "random" else magnitude_prune
    fn(masks, r)
    for name, w in masks.weights.items():
        zeros = int((w == 0).sum())
        assert abs(zeros - r * w.numel()) <= 1, name
        assert int((~masks.masks[name]).sum()) == zeros
    # pruning again to a higher target only adds zeros, never revives
    old = {n: m.clone() for n, m in masks.masks.items()}
    fn(masks, min(0.95, r + 0.3))
    for n in old:
        assert not (masks.masks[n] & ~old[n]).any()


def test_magnitude_prunes_smallest_and_random_samples_remaining():
    lin = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[5.0, -0.1, 3.0, 0.2, -4.0, 0.3, 1.0, -2.0, 0.05, 6.0]]))
    masks = WeightMasks(nn.Sequential(lin))
    magnitude_prune(masks, 0.4)
    assert lin.weight[0].tolist() == [5.0, 0.0, 3.0, 0.0, -4.0, 0.0, 1.0, -2.0, 0.0, 6.0]
    # random: a zero weight counts as pruned, new picks come from the non-zero ones
    conv = nn.Conv2d(2, 3, 3)
    with torch.no_grad():
        conv.weight[0].zero_()  # 18 of 54 already zero
    masks = WeightMasks(nn.Sequential(conv))
    counts = random_prune(masks, 0.5, torch.Generator().manual_seed(3))
    assert counts["0"] == 27 - 18
    assert int((conv.weight == 0).sum()) == 27
    assert (conv.weight[0] == 0).all()


def test_pruned_weights_stay_zero_under_adam():
    model = conv_net()
    bs = batches()
    pruner = BayesFactorPruner(model, mode="magnitude", sparsity=0.7, likelihood_data=bs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner.attach(opt)
    # build up Adam moments before pruning, so they would resurrect weights if not handled
    for x, y in bs:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    pruner.end_of_epoch(1)
    masks = {n: m.clone() for n, m in pruner.masks.masks.items()}
    for _ in range(5):
        for x, y in bs:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            for n, w in pruner.masks.weights.items():
                assert (w.grad[~masks[n]] == 0).all()  # gradient hook
            opt.step()
    for n, w in pruner.masks.weights.items():
        assert (w[~masks[n]] == 0).all()
        assert (w[masks[n]] != 0).all()  # the kept weights did train
    # the WeightMasks.apply route without attach() works too
    m2 = conv_net(1)
    wm = WeightMasks(m2)
    magnitude_prune(wm, 0.5)
    opt2 = torch.optim.Adam(m2.parameters(), lr=1e-2)
    x, y = bs[0]
    for _ in range(3):
        opt2.zero_grad()
        nn.functional.cross_entropy(m2(x), y).backward()
        opt2.step()
        wm.apply(opt2)
    assert abs(wm.global_weight_sparsity() - 0.5) < 0.01


def test_beta_inf_never_prunes_and_zero_always_prunes():
    bs = batches()
    never = BayesFactorPruner(conv_net(), sparsity=0.5, beta=math.inf, likelihood_data=bs)
    for e in range(3):
        rec = never.end_of_epoch(e)
        assert not rec["pruned"] and rec["sparsity"] == 0.0
    always = BayesFactorPruner(
        conv_net(), sparsity=0.5, beta=0.0, likelihood_data=bs, first_log_bf=-math.inf, persistent=False
    )
    for e in range(3):
        assert always.end_of_epoch(e)["pruned"]


def test_gate_follows_last_log_bf():
    bs = batches()
    pruner = BayesFactorPruner(conv_net(), sparsity=0.5, beta=1.0, likelihood_data=bs, first_log_bf=-1.0)
    rec = pruner.end_of_epoch(1)
    assert not rec["pruned"] and rec["log_bf"] == 0.0  # Algorithm 1: nothing pruned -> BF = 1
    pruner = BayesFactorPruner(conv_net(), sparsity=0.5, beta=0.5, likelihood_data=bs, first_log_bf=0.0)
    assert pruner.end_of_epoch(1)["pruned"]  # 0 > log(0.5)
    # log BF of a huge positive value opens the gate, -inf closes it
    pruner.log_bf = -math.inf
    assert not pruner.should_prune()


def test_ungated_baseline_prunes_every_epoch_without_data():
    pruner = BayesFactorPruner(conv_net(), mode="random", sparsity=0.3, gated=False, persistent=False)
    for e in range(2):
        rec = pruner.end_of_epoch(e)
        assert rec["pruned"] and math.isnan(rec["log_bf"])
        assert abs(rec["sparsity"] - 0.3) < 0.02


def test_steps_ramp_the_target():
    bs = batches()
    pruner = BayesFactorPruner(conv_net(), mode="magnitude", sparsity=0.8, beta=0.0, steps=4, likelihood_data=bs)
    got = [pruner.end_of_epoch(e)["sparsity"] for e in range(5)]
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 0.8], abs=0.01)


def test_errors():
    model = conv_net()
    for r in (-0.1, 1.0, 1.5, 50, float("nan")):
        with pytest.raises(ValueError):
            BayesFactorPruner(model, sparsity=r)
        with pytest.raises(ValueError):
            magnitude_prune(WeightMasks(conv_net()), r)
        with pytest.raises(ValueError):
            random_prune(WeightMasks(conv_net()), r)
    with pytest.raises(ValueError, match="beta"):
        BayesFactorPruner(model, beta=-1.0)
    with pytest.raises(ValueError, match="mode"):
        BayesFactorPruner(model, mode="l1")
    no_weights = nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="no prunable weights"):
        prunable_weights(no_weights)
    with pytest.raises(ValueError, match="no prunable weights"):
        BayesFactorPruner(no_weights)
    with pytest.raises(ValueError, match="ReLU"):
        prunable_weights(model, ["1"])
    with pytest.raises(ValueError, match="likelihood"):
        BayesFactorPruner(conv_net()).end_of_epoch(1)


def test_prunable_weights_selection_and_dead_structures():
    model = conv_net()
    ws = prunable_weights(model)
    assert list(ws) == ["0", "4", "6"]
    assert list(prunable_weights(model, ["4", model[6]])) == ["4", "6"]
    assert count_dead_structures(model)["dead"] == 0
    with torch.no_grad():
        model[0].weight[1].zero_()  # one conv filter
        model[4].weight[3].zero_()  # one neuron
        model[4].weight[5, :10].zero_()  # partially zero: not dead
    dead = count_dead_structures(model)
    assert dead["per_layer"]["0"] == {"dead": 1, "total": 4}
    assert dead["per_layer"]["4"] == {"dead": 1, "total": 16}
    assert dead["dead"] == 2 and dead["total"] == 4 + 16 + 3


def test_fixed_batches_are_fixed():
    x, y = data(100)
    ds = TensorDataset(x, y)
    a = fixed_batches(ds, 2, batch_size=16, seed=5)
    b = fixed_batches(ds, 2, batch_size=16, seed=5)
    assert len(a) == 2 and all(torch.equal(p[0], q[0]) for p, q in zip(a, b))
    pruner = BayesFactorPruner(conv_net(), likelihood_batches=2, likelihood_batch_size=16, likelihood_data=ds)
    assert len(pruner.likelihood_data) == 2


def test_train_bayes_factor_smoke_on_digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    tr, va, te = perm[:1000], perm[1000:1400], perm[1400:]
    splits = SimpleNamespace(
        train=TensorDataset(x[tr], y[tr]), val=TensorDataset(x[va], y[va]), test=TensorDataset(x[te], y[te])
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    pruner = BayesFactorPruner(model, mode="magnitude", sparsity=0.75, likelihood_batches=2)
    hist = train_bayes_factor(model, splits, epochs=3, lr=1e-2, batch_size=64, pruner=pruner, progress=False)
    assert hist["pruned"][0] is True
    assert math.isfinite(hist["log_bf"][0])
    assert hist["sparsity"] == pytest.approx([0.75] * 3, abs=0.01)
    assert len(hist["val_acc"]) == 3 and hist["test_acc"] > 0.5
    for name, w in pruner.masks.weights.items():
        assert abs(float((w == 0).float().mean()) - 0.75) < 0.01
    base = train_bayes_factor(
        nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), splits, epochs=1, pruner=None, progress=False
    )
    assert base["sparsity"][0] == 0.0 and math.isnan(base["log_bf"][0])
    rep = hist["shrink_dead"]
    assert "error" not in rep and rep["params_before"] == 64 * 32 + 32 + 32 * 10 + 10
    assert rep["params_after"] == rep["params_before"] - rep["removed"] * (64 + 1 + 10)


def test_skip_policies():
    bs = batches()
    keep = BayesFactorPruner(conv_net(), sparsity=0.5, beta=1.0, likelihood_data=bs, first_log_bf=-2.0, on_skip="keep")
    rec = keep.end_of_epoch(1)
    assert not rec["pruned"] and rec["log_bf"] == -2.0
    model = conv_net()
    snapshot = [p.detach().clone() for p in model.parameters()]
    trial = BayesFactorPruner(model, mode="magnitude", sparsity=0.5, likelihood_data=bs, first_log_bf=-2.0, on_skip="trial")
    rec = trial.end_of_epoch(1)
    assert not rec["pruned"] and rec["sparsity"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.parameters()))  # restored
    assert trial.masks.global_sparsity() == 0.0
    # the trial log BF is the one a real pruning gives
    real = BayesFactorPruner(conv_net(), mode="magnitude", sparsity=0.5, likelihood_data=bs)
    assert real.end_of_epoch(1)["log_bf"] == pytest.approx(rec["log_bf"], rel=1e-9)
    with pytest.raises(ValueError, match="on_skip"):
        BayesFactorPruner(conv_net(), on_skip="never")


def test_shrink_dead_removes_dead_neurons_and_keeps_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 10)
    )
    with torch.no_grad():
        model[1].weight[[0, 3, 5]] = 0.0  # dead, biases kept (relu(b) folded into layer 3's bias)
        model[1].bias[0] = 0.7
        model[1].bias[3] = -1.0  # relu(-1) = 0
        model[3].weight[[1, 2]] = 0.0
        model[3].bias[[1, 2]] = 0.0  # weights and bias zero
        model[5].weight[4] = 0.0  # an output row: never removed
    x = torch.randn(24, 1, 8, 8)
    before = [p.detach().clone() for p in model.parameters()]
    small, rep = shrink_dead(model, x[:4], x[4:])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # input model untouched
    assert rep["dead"] == 6 and rep["removed"] == 5 and rep["kept_layers"] == {}
    assert rep["removed_per_layer"] == {"1": 3, "3": 2, "5": 0}
    # by hand: 64->13, 13->6, 6->10
    assert rep["params_before"] == 64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10
    assert rep["params_after"] == 64 * 13 + 13 + 13 * 6 + 6 + 6 * 10 + 10
    assert sum(p.numel() for p in small.parameters()) == rep["params_after"]
    model.eval()
    assert torch.allclose(small(x), model(x), atol=1e-5)


def test_shrink_dead_keeps_what_cannot_be_folded_exactly():
    # A dead conv filter with relu(bias) > 0 feeds a padded conv: the border sees the zero padding,
    # not the constant, so that layer's dead filters stay; the conv -> flatten -> linear one goes.
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 16, 10),
    )
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.5
        model[2].weight[[0, 4]] = 0.0
    x = torch.randn(16, 1, 8, 8)
    small, rep = shrink_dead(model, x[:4], x[4:])
    assert rep["removed_per_layer"] == {"0": 0, "2": 2, "6": 0}
    assert "0" in rep["kept_layers"]
    assert small[2].out_channels == 4 and small[6].in_features == 4 * 16
    model.eval()
    assert torch.allclose(small(x), model(x), atol=1e-5)


def _digits_splits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va, te = perm[:600], perm[600:800], perm[800:1000]
    return SimpleNamespace(train=TensorDataset(x[tr], y[tr]), val=TensorDataset(x[va], y[va]),
                           test=TensorDataset(x[te], y[te]))


def _bf_run(splits, epochs, checkpoint=None, lr=1e-2, beta=0.0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # random pruning ramped over 3 events: the stored log BF, the pruning generator and the
    # shuffling generator all carry state from one epoch to the next
    pruner = BayesFactorPruner(model, mode="random", sparsity=0.6, steps=3, beta=beta, on_skip="keep",
                               likelihood_batches=2, seed=3)
    hist = train_bayes_factor(model, splits, epochs=epochs, lr=lr, batch_size=64, pruner=pruner,
                              progress=False, seed=5, checkpoint=checkpoint, report_shrink=False)
    return model, pruner, hist


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_interrupted_training_resumes_exactly(tmp_path, beta):
    splits = _digits_splits()
    model_a, pruner_a, hist_a = _bf_run(splits, 4, beta=beta)
    if beta == 0:  # the gate lets every event through: pruned in epochs 1, 2 and 3
        assert all(n > 0 for n in hist_a["num_pruned"][:3])
        assert all(math.isfinite(v) for v in hist_a["log_bf"][:3])
    else:  # the first event's log BF < 0 closes the gate for good (on_skip="keep")
        assert hist_a["pruned"] == [True, False, False, False] and hist_a["log_bf"][0] < 0
    ckpt = tmp_path / "checkpoint.pt"
    _bf_run(splits, 2, ckpt, beta=beta)  # "interrupted" after epoch 2
    assert ckpt.exists() and not (tmp_path / "checkpoint.pt.tmp").exists()
    model_b, pruner_b, hist_b = _bf_run(splits, 4, ckpt, beta=beta)  # a new process builds the same objects
    assert hist_a["resumed_from_epoch"] == 0 and hist_b["resumed_from_epoch"] == 2
    assert hist_b["epoch"] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_acc", "log_bf", "pruned", "num_pruned", "sparsity",
                "layer_sparsity", "dead_structures", "test_loss", "test_acc"):
        assert hist_b[key] == hist_a[key], key
    for (n, pa), pb in zip(model_a.state_dict().items(), model_b.state_dict().values()):
        assert torch.equal(pa, pb), n
    assert pruner_b.log_bf == pruner_a.log_bf and pruner_b.prune_events == pruner_a.prune_events
    for n in pruner_a.masks.names():
        assert torch.equal(pruner_a.masks.mask(n), pruner_b.masks.mask(n))
    assert [r["log_bf"] for r in pruner_b.history] == [r["log_bf"] for r in pruner_a.history]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    splits = _digits_splits()
    ckpt = tmp_path / "checkpoint.pt"
    _bf_run(splits, 2, ckpt)
    with pytest.raises(ValueError, match=r"another configuration.*'lr': \(0\.01, 0\.02\)"):
        _bf_run(splits, 3, ckpt, lr=2e-2)
    with pytest.raises(ValueError, match="at epoch 2, past the 1 epochs"):
        _bf_run(splits, 1, ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot be read"):
        _bf_run(splits, 3, ckpt)


def test_train_bayes_factor_reports_the_test_set_numbers_of_its_final_model():
    """test_acc / test_loss of the history are those of a plain float64 pass over splits.test."""
    splits = _digits_splits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    pruner = BayesFactorPruner(model, mode="magnitude", sparsity=0.5, likelihood_batches=2)
    hist = train_bayes_factor(model, splits, epochs=1, pruner=pruner, progress=False, report_shrink=False)
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    y = torch.stack([splits.test[i][1] for i in range(len(splits.test))])
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    assert hist["test_acc"] == float((logits.argmax(1) == y).double().mean())
    assert hist["test_loss"] == pytest.approx(float(nn.functional.cross_entropy(logits, y)), rel=1e-6)


def test_bf_run_config_rejects_bad_values_naming_them():
    from bayesprune.experiments.bf_training import BayesFactorRunConfig

    for kw, needle in [(dict(sparsity=1.5), "sparsity must lie in \\[0, 1\\), got 1.5"),
                       (dict(sparsity=None), "sparsity"),
                       (dict(mode="shuffle"), "mode must be one of none, random, magnitude"),
                       (dict(epochs=0), "epochs must be an integer >= 1, got 0"),
                       (dict(batch_size=2.5), "batch_size"),
                       (dict(lr=float("nan")), "lr must be a positive number"),
                       (dict(on_skip="never"), "on_skip must be one of unit, keep, trial")]:
        with pytest.raises(ValueError, match=needle):
            BayesFactorRunConfig(**kw)
    assert BayesFactorRunConfig(mode="none", sparsity=None).sparsity is None


def test_bf_grid_and_run_directories():
    from bayesprune.experiments.bf_training import bayes_factor_grid, bf_run_dir

    cfgs = bayes_factor_grid(modes=["none", "random", "random", "magnitude"], sparsities=[0.5, 0.99], seeds=[0, 1],
                             model="cnn", dataset="mnist", out_dir="o", gated=False, spare_output=True)
    assert [(c.mode, c.sparsity, c.seed) for c in cfgs] == [
        ("none", None, 0), ("none", None, 1),
        ("random", 0.5, 0), ("random", 0.5, 1), ("random", 0.99, 0), ("random", 0.99, 1),
        ("magnitude", 0.5, 0), ("magnitude", 0.5, 1), ("magnitude", 0.99, 0), ("magnitude", 0.99, 1),
    ]
    dirs = [bf_run_dir(c).as_posix() for c in cfgs]
    assert dirs[0] == "o/bf-cnn-mnist/none/seed0"
    assert dirs[4] == "o/bf-cnn-mnist/random-plain-r0.99-spare-output/seed0"
    gated = bayes_factor_grid(modes=["magnitude"], sparsities=[0.25], seeds=[3], model="fcn", dataset="digits", out_dir="o")
    assert bf_run_dir(gated[0]).as_posix() == "o/bf-fcn-digits/magnitude-bayes-r0.25/seed3"


def test_run_bayes_factor_writes_what_bf_run_writes(tmp_path, capsys):
    """The function the CLI and reproduce call: the same directory, summary (config included) and
    history as `bayesprune bf-run`; its config holds exactly the bf-run options."""
    import json

    from bayesprune.experiments import cli
    from bayesprune.experiments.bf_training import BayesFactorRunConfig, bf_run_dir, run_bayes_factor

    argv = ["bf-run", "--model", "fcn", "--dataset", "digits", "--epochs", "1", "--sparsity", "0.75",
            "--mode", "magnitude", "--likelihood-batches", "2", "--seeds", "0", "--quiet", "--device", "cpu",
            "--out-dir", str(tmp_path / "cli")]
    assert cli.main(argv) == 0
    args = cli.build_parser().parse_args(argv)
    cfg = BayesFactorRunConfig(model="fcn", dataset="digits", epochs=1, mode="magnitude", sparsity=0.75,
                               likelihood_batches=2, seed=0, quiet=True, device="cpu", out_dir=str(tmp_path / "fn"))
    options = set(vars(args)) - {"func", "command", "mode", "sparsity", "seeds"}
    assert set(vars(cfg)) == options | {"mode", "sparsity", "seed"}
    summary = run_bayes_factor(cfg)
    d = bf_run_dir(cfg)
    assert d == tmp_path / "fn" / "bf-fcn-digits" / "magnitude-bayes-r0.75" / "seed0"
    on_disk = json.loads((d / "summary.json").read_text())
    assert json.dumps(on_disk) == json.dumps(summary)
    by_cli = json.loads((tmp_path / "cli" / "bf-fcn-digits" / "magnitude-bayes-r0.75" / "seed0" / "summary.json").read_text())
    assert list(by_cli["config"]) == list(summary["config"])
    for k in set(by_cli) - {"wall_time_s", "config"}:
        assert by_cli[k] == summary[k], k
    assert {k: v for k, v in by_cli["config"].items() if k != "out_dir"} == \
        {k: v for k, v in summary["config"].items() if k != "out_dir"}
    h_cli = json.loads((tmp_path / "cli" / "bf-fcn-digits" / "magnitude-bayes-r0.75" / "seed0" / "history.json").read_text())
    h_fn = json.loads((d / "history.json").read_text())
    for k in ("train_loss", "val_loss", "val_acc", "log_bf", "sparsity", "test_acc"):
        assert h_cli[k] == h_fn[k], k
    assert not (d / "checkpoint.pt").exists() and (d / "curves.png").stat().st_size > 0
    capsys.readouterr()
    assert run_bayes_factor(cfg) == summary  # finished: skipped, the stored summary returned
    assert "skip" in capsys.readouterr().out


def test_reproduce_bf_table1_calls_run_bayes_factor_not_the_cli(tmp_path, monkeypatch):
    from bayesprune.experiments import bf_training, cli
    from bayesprune.experiments.reproduce import reproduce

    seen = []

    def no_cli(argv=None):
        raise AssertionError(f"reproduce went through the CLI: {argv}")

    monkeypatch.setattr(cli, "main", no_cli)
    monkeypatch.setattr(bf_training, "run_bayes_factor", lambda cfg, data_cache=None: seen.append(cfg) or {})
    reproduce("bf-table1", tmp_path, seeds=(0, 1), epochs=3, models=["fcn"], datasets=["digits"], progress=False)
    plain = [c for c in seen if not c.gated]
    gated = [c for c in seen if c.gated]
    assert len(plain) == 2 * (2 * 5 + 1) and len(gated) == 2 * 2 * 5  # the unpruned runs once, with the plain group
    assert {(c.mode, c.sparsity) for c in gated} == {(m, r) for m in ("random", "magnitude")
                                                      for r in (0.25, 0.5, 0.75, 0.9, 0.99)}
    assert {c.mode for c in plain} == {"random", "magnitude", "none"}
    assert all(c.epochs == 3 and c.quiet and c.out_dir == str(tmp_path) and c.model == "fcn" for c in seen)


def test_bf_run_directory_is_locked_while_it_runs(tmp_path):
    """A Bayes-factor run takes its directory's lock as a BMRS run does: a second process on the
    same run is refused at once, naming the directory, and leaves nothing behind; once the holder
    is gone the run goes ahead."""
    from bayesprune.experiments.bf_training import BayesFactorRunConfig, bf_run_dir, run_bayes_factor
    from bayesprune.experiments.rundir import RunLock, RunLockedError

    cfg = BayesFactorRunConfig(model="fcn", dataset="digits", epochs=1, mode="magnitude", sparsity=0.5,
                               likelihood_batches=1, seed=0, quiet=True, device="cpu", out_dir=str(tmp_path))
    d = bf_run_dir(cfg)
    d.mkdir(parents=True)
    with RunLock(d):  # another holder (flock conflicts between two open files, also in one process)
        with pytest.raises(RunLockedError, match=str(d)):
            run_bayes_factor(cfg)
        assert sorted(p.name for p in d.iterdir()) == ["run.lock"]
    summary = run_bayes_factor(cfg)
    assert json.loads((d / "summary.json").read_text())["test_acc"] == summary["test_acc"] > 0.5
    RunLock(d).acquire().release()  # the finished run holds no lock
