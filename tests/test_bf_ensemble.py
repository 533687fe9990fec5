"""experiments/ensemble.py for Bayes-factor runs: K runs of the FCN or CNN trained as one batched
ensemble give each member the numbers of its single run (bf_training.run_bayes_factor alone).

Unit level: one batched epoch (_PlainBatch) of members whose pruners have pruned against each
member's own bf_training._train_epoch from the same state: parameters (pruned weights still
zero), gradients, Adam moments, the epoch's mean loss and the loader generator after it.
Run level: the summaries and histories of an ensemble of runs of every mode (random, magnitude,
the unpruned baseline; gated and plain; two seeds) equal the single runs' except times; a member
whose run fails fails alone.  reproduce bf-table1 with --ensemble K equals --ensemble 1, and auto
prints the probe's ratio and records it in every summary.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from bayesprune.bayes_factor import BayesFactorPruner, WeightMasks
from bayesprune.experiments import bf_training, ensemble
from bayesprune.experiments.bf_training import BayesFactorRunConfig, bf_run_dir, run_bayes_factor
from bayesprune.experiments.data import ImageTensorDataset, load_dataset, make_loader
from bayesprune.experiments.models import build_model
from bayesprune.experiments.reproduce import reproduce
from bayesprune.experiments.rundir import RunLock

CPU = torch.device("cpu")
TIMES = ("wall_time_s", "seconds", "ensemble")


def _pruned_member(name, seed, mode, splits, data):
    """A model, its Adam (with state) and pruner after one pruning event, and its loader."""
    torch.manual_seed(seed)
    model = build_model(name, splits.in_channels, splits.image_size, splits.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    pruner = BayesFactorPruner(model, mode=mode, sparsity=0.5, gated=False, seed=seed)
    pruner.attach(opt)
    bf_training._train_epoch(model, opt, make_loader(data, 16, True, seed=seed + 7), CPU, pruner.masks)
    pruner.end_of_epoch(1, optimizer=opt)
    return model, opt, pruner, make_loader(data, 16, True, seed=seed)


@pytest.mark.parametrize("name", ["fcn", "cnn"])
def test_one_batched_epoch_equals_each_members_own(name):
    splits = load_dataset("digits", seed=0)
    data = ImageTensorDataset(splits.train.images[:40], splits.train.labels[:40])  # steps of 16, 16, 8
    members, singles = [], []
    for seed, mode in ((0, "random"), (3, "magnitude")):
        model, opt, pruner, loader = _pruned_member(name, seed, mode, splits, data)
        twin = copy.deepcopy(model)
        twin_opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
        twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict shares the tensors
        twin_masks = WeightMasks(twin)  # the pruner's masks on the twin, with its hooks
        twin_masks.load_state_dict(pruner.masks.state_dict())
        twin_masks.attach(twin_opt)
        twin_loader = make_loader(data, 16, True, seed=seed)
        mean = bf_training._train_epoch(twin, twin_opt, twin_loader, CPU, twin_masks)
        singles.append((twin, twin_opt, mean, twin_loader.generator.get_state()))
        members.append(ensemble._Waiting((model, opt, loader, CPU, pruner.masks), {"torch": torch.get_rng_state(), "cuda": []},
                                         ensemble._Kind(None, bf_training.EPOCH_RUNNER, bf_training._train_epoch,
                                                        ensemble._PlainBatch)))
    assert [len(g) for g in ensemble._groups(members)] == [2]
    results, _ = ensemble._PlainBatch(members).epoch()
    for k, (twin, twin_opt, mean, gen) in enumerate(singles):
        model, opt, loader, _, masks = members[k].request[0]
        assert results[k] == pytest.approx(mean, rel=1e-5)
        assert torch.equal(loader.generator.get_state(), gen)
        theirs = dict(twin.named_parameters())
        for pname, p in model.named_parameters():
            q = theirs[pname]
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), pname
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), pname
            s, t = opt.state[p], twin_opt.state[q]
            assert float(s["step"]) == float(t["step"])
            assert torch.allclose(s["exp_avg"], t["exp_avg"], rtol=1e-4, atol=1e-8), pname
            assert torch.allclose(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-4, atol=1e-12), pname
        zeros = 0
        for layer, w in masks.weights.items():
            m = masks.mask(layer)
            assert torch.equal(w[~m.bool()], torch.zeros_like(w[~m.bool()])), layer  # pruned weights stayed zero
            assert torch.equal(opt.state[w]["exp_avg"][~m.bool()], torch.zeros_like(w[~m.bool()])), layer
            zeros += int((~m.bool()).sum())
        assert zeros > 0.4 * sum(w.numel() for w in masks.weights.values())  # the pruner really pruned
    a, b = (dict(m.request[0][0].named_parameters()) for m in members)
    assert not torch.allclose(next(iter(a.values())), next(iter(b.values())))  # the members differ


RUNS = [("random", 0.5, 0, True), ("magnitude", 0.75, 1, False), ("none", None, 0, False), ("magnitude", 0.9, 0, True)]


def _cfgs(root, name="fcn"):
    return [BayesFactorRunConfig(model=name, dataset="digits", out_dir=str(root), epochs=2, quiet=True, mode=m, sparsity=r,
                                 seed=s, gated=g) for m, r, s, g in RUNS]


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in TIMES and k != "out_dir"}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def _same(a, b):
    a, b = _strip(a), _strip(b)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7, nan_ok=True), k
        elif isinstance(a[k], dict):
            _same(a[k], b[k])
        else:
            assert a[k] == b[k], k


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, [run_bayes_factor(c) for c in _cfgs(root)]


def test_the_ensembles_runs_equal_the_single_runs(singles, tmp_path):
    sroot, ref = singles
    got = ensemble.run_bf_ensemble(_cfgs(tmp_path))
    for cfg, a, b in zip(_cfgs(tmp_path), got, ref):
        _same(a, b)
        mine = json.loads((bf_run_dir(cfg) / "history.json").read_text())
        theirs = json.loads((sroot / bf_run_dir(cfg).relative_to(tmp_path) / "history.json").read_text())
        for key in ("train_loss", "val_loss", "val_acc"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
        assert mine["pruned"] == theirs["pruned"] and mine["sparsity"] == theirs["sparsity"]
    assert {round(s["final_sparsity"], 2) for s in got} == {0.5, 0.75, 0.0, 0.9}  # the members pruned differently


def test_a_failing_member_fails_alone(singles, tmp_path):
    _, ref = singles
    cfgs = _cfgs(tmp_path)
    bf_run_dir(cfgs[1]).mkdir(parents=True)
    with RunLock(bf_run_dir(cfgs[1])):  # another process holds member 1's run directory
        got = ensemble.run_bf_ensemble(cfgs)
    assert isinstance(got[1], Exception) and str(bf_run_dir(cfgs[1])) in str(got[1])
    for i in (0, 2, 3):
        _same(got[i], ref[i])


def test_members_must_share_the_network_and_its_training(tmp_path):
    a = BayesFactorRunConfig(model="fcn", out_dir=str(tmp_path), seed=0)
    with pytest.raises(ValueError, match=r"ensemble member 1 .* has lr=0.01 but member 0 has 0.001"):
        ensemble.check_bf_members([a, BayesFactorRunConfig(model="fcn", out_dir=str(tmp_path), seed=1, lr=1e-2)])
    with pytest.raises(ValueError, match="share the run directory"):
        ensemble.check_bf_members([a, a])
    p = ensemble.bf_probe([a, BayesFactorRunConfig(model="cnn", out_dir=str(tmp_path), seed=1)])
    assert p.ratio is None and "has model='cnn'" in p.error


def _summaries(root):
    return {str(p.relative_to(root)): json.loads(p.read_text()) for p in sorted(root.rglob("summary.json"))}


def test_reproduce_with_ensembles_gives_the_single_runs_table(tmp_path, capsys):
    kw = dict(seeds=(0,), epochs=1, models=["fcn"], datasets=["digits"], progress=False)
    reproduce("bf-table1", tmp_path / "single", ensemble=1, **kw)
    reproduce("bf-table1", tmp_path / "k4", ensemble=4, **kw)
    single, batched = _summaries(tmp_path / "single"), _summaries(tmp_path / "k4")
    assert len(single) == 21 and single.keys() == batched.keys()
    for k in single:
        _same(batched[k], single[k])
        assert "ensemble" not in single[k] and batched[k]["ensemble"]["size"] in (3, 4)
    reproduce("bf-table1", tmp_path / "auto", **kw)
    out = capsys.readouterr().out
    assert "ensemble probe bf fcn/digits gated, 10 runs: 10 single runs" in out and "ensemble/single throughput" in out
    auto = _summaries(tmp_path / "auto")
    for k in single:
        _same(auto[k], single[k])
        assert auto[k]["ensemble"]["probe_ratio"] > 0
