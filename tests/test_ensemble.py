"""experiments/ensemble.py: K runs of one small network trained as one batched ensemble give each
member the numbers of its single run (run_continuous on its own).

Unit level (one batched epoch of two steps against each member's own training._train_epoch from
the same state): the logits, the gradients, the Adam state and the parameters after the updates,
the epoch's mean losses and the generator state after it, for the MLP and LeNet5 with noise.
Run level: the summaries and metric files of an ensemble of three runs (two seeds, two methods)
equal those of the three single runs except times; a run interrupted on its own resumes inside
an ensemble to the uninterrupted numbers; a member whose run fails (its directory locked) fails
alone; batched epochs falling back to the members' own code give the same numbers too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from bayesprune.experiments import ensemble, training
from bayesprune.experiments.data import ImageTensorDataset, load_dataset, make_loader
from bayesprune.experiments.rundir import RunLock
from bayesprune.experiments.training import resolve_config, run_continuous

TIMES = ("wall_time_s", "epoch_time", "size_speed", "machine", "train_wall_time_s")
CPU = torch.device("cpu")


class _Waiting:
    """A member as the coordinator sees it while it waits for an epoch."""

    def __init__(self, args, rng):
        self.request = (args, rng)


def _member(model_name: str, seed: int, data):
    cfg = resolve_config(model=model_name, seed=seed, device="cpu")
    training._seed_all(seed)
    model, _ = training._build(cfg, data, CPU)
    return cfg, model, training._optimizer(model, cfg), torch.get_rng_state()


@pytest.mark.parametrize("model_name", ["mlp", "lenet5"])
def test_one_batched_epoch_equals_each_members_own(model_name):
    splits = load_dataset("digits", seed=0)
    small = ImageTensorDataset(splits.train.images[:24], splits.train.labels[:24])  # steps of 16 and 8
    members, singles, logits = [], [], []
    for seed in (0, 3):
        cfg, model, opt, rng = _member(model_name, seed, splits)
        twin, twin_opt = copy.deepcopy(model), None
        twin_opt = training._optimizer(twin, cfg)
        twin_opt.load_state_dict(opt.state_dict())
        members.append(_Waiting((model, opt, make_loader(small, 16, True, seed=seed), cfg, splits.num_train, CPU, "e"),
                                {"torch": rng, "cuda": []}))
        torch.set_rng_state(rng)
        x, y = small[list(range(16))]
        twin.train()
        logits.append(twin(x).detach())  # the single network's first forward on these inputs
        torch.set_rng_state(rng)
        means = training._train_epoch(twin, twin_opt, make_loader(small, 16, True, seed=seed), cfg, splits.num_train, CPU, "e")
        singles.append((twin, twin_opt, means, torch.get_rng_state()))
    start = [[p.detach().clone() for p in m.request[0][0].parameters()] for m in members]
    batch = ensemble._Batch(members)
    gens = [torch.Generator().set_state(m.request[1]["torch"]) for m in members]
    x = torch.stack([small[list(range(16))][0]] * 2)
    with torch.no_grad():
        out = batch._forward(x, gens)
    for k in range(2):
        assert torch.allclose(out[k], logits[k], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])  # the members differ (seeds)
    results, rng_after = ensemble._Batch(members).epoch()
    for k, (twin, twin_opt, means, rng) in enumerate(singles):
        model, opt = members[k].request[0][:2]
        assert results[k] == pytest.approx(means, rel=1e-5)
        assert torch.equal(rng_after[k]["torch"], rng)
        theirs = dict(twin.named_parameters())
        for name, p in model.named_parameters():
            q = theirs[name]
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), name
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
            s, t = opt.state[p], twin_opt.state[q]
            assert float(s["step"]) == float(t["step"]) == 2
            assert torch.allclose(s["exp_avg"], t["exp_avg"], rtol=1e-4, atol=1e-8), name
            assert torch.allclose(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-4, atol=1e-12), name
        assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start[k]))  # the updates were real


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
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
        else:
            assert a[k] == b[k], k


def _metrics(path):
    return [_strip(json.loads(line)) for line in (path / "metrics.jsonl").read_text().splitlines()]


OPTS = dict(dataset="digits", model="mlp", epochs=2, finetune_epochs=1, device="cpu")
RUNS = [(0, "bmrs_n", {}), (1, "bmrs_n", {}), (0, "etheta", {"compression": 0.3})]


@pytest.fixture(scope="module")
def singles(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return root, [run_continuous(resolve_config(**OPTS, seed=s, method=m, **o, out_dir=str(root / f"{m}{s}")), progress=False)
                  for s, m, o in RUNS]


def _cfgs(root):
    return [resolve_config(**OPTS, seed=s, method=m, **o, out_dir=str(root / f"{m}{s}")) for s, m, o in RUNS]


def test_the_ensembles_runs_equal_the_single_runs(singles, tmp_path):
    sroot, ref = singles
    got = ensemble.run_ensemble(_cfgs(tmp_path))
    for (s, m, _), a, b in zip(RUNS, got, ref):
        _same(a, b)
        ma, mb = _metrics(tmp_path / f"{m}{s}"), _metrics(sroot / f"{m}{s}")
        for ra, rb in zip(ma, mb):
            _same(ra, rb)
        assert len(ma) == 3
    assert got[2]["param_compression"] > 0.2  # etheta pruned: masks differ between members


def test_an_interrupted_single_run_resumes_in_an_ensemble(singles, tmp_path, monkeypatch):
    sroot, ref = singles
    cfgs = _cfgs(tmp_path)
    original, calls = training._train_epoch, []

    def stop_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    monkeypatch.setattr(training, "_train_epoch", stop_second)
    with pytest.raises(KeyboardInterrupt):
        run_continuous(cfgs[1], progress=False)
    monkeypatch.setattr(training, "_train_epoch", original)
    assert (tmp_path / "bmrs_n1" / "checkpoint.pt").exists() and not (tmp_path / "bmrs_n1" / "summary.json").exists()
    got = ensemble.run_ensemble(cfgs[:2])  # member 1 one epoch ahead: it trains in a group of its own until done
    _same(got[1], ref[1])
    _same(got[0], ref[0])


def test_a_failing_member_fails_alone(singles, tmp_path):
    _, ref = singles
    (tmp_path / "etheta0").mkdir()
    lock = RunLock(tmp_path / "etheta0").acquire()
    try:
        got = ensemble.run_ensemble(_cfgs(tmp_path))
    finally:
        lock.release()
    assert isinstance(got[2], Exception) and "in use" in str(got[2])
    _same(got[0], ref[0])
    _same(got[1], ref[1])


def test_fallback_epochs_give_the_single_runs_numbers(singles, tmp_path, monkeypatch):
    _, ref = singles
    monkeypatch.setattr(ensemble._Batch, "epoch", lambda self: (_ for _ in ()).throw(ensemble._Fallback()))
    got = ensemble.run_ensemble(_cfgs(tmp_path)[:2])
    _same(got[0], ref[0])
    _same(got[1], ref[1])


def test_members_must_share_the_network_and_its_training(tmp_path):
    a = resolve_config(**OPTS, seed=0, out_dir=str(tmp_path / "a"))
    with pytest.raises(ValueError, match="has lr=0.01 but member 0 has 0.003"):
        ensemble.check_members([a, resolve_config(**OPTS, seed=1, lr=0.01, out_dir=str(tmp_path / "b"))])
    with pytest.raises(ValueError, match="shrinks during training"):
        ensemble.check_members([a, resolve_config(**OPTS, seed=1, shrink=True, out_dir=str(tmp_path / "b"))])
    with pytest.raises(ValueError, match="share the run directory"):
        ensemble.check_members([a, resolve_config(**OPTS, seed=1, out_dir=str(tmp_path / "a"))])


def test_reproduce_with_ensembles_gives_the_single_runs_tables(tmp_path):
    from bayesprune.experiments.reproduce import ensemble_groups, reproduce

    opts = dict(seeds=[0, 1], epochs=1, datasets=["digits"], models=["mlp"], progress=False, device="cpu",
                methods=(("bmrs_n", None),))
    one = reproduce("bmrs-table1", tmp_path / "single", **opts)
    four = reproduce("bmrs-table1", tmp_path / "ensemble", ensemble=4, **opts)
    assert not one["failures"] and not four["failures"]
    by_dir = {Path(s["config"]["out_dir"]).relative_to(tmp_path / "single"): s for s in one["summaries"]}
    assert len(by_dir) == len(four["summaries"]) == 4  # 2 seeds x (bmrs_n, then l2 at bmrs_n's compression)
    for s in four["summaries"]:
        _same(s, by_dir[Path(s["config"]["out_dir"]).relative_to(tmp_path / "ensemble")])
    cfgs = [resolve_config(**OPTS, seed=s, out_dir=str(tmp_path / str(s))) for s in range(5)]
    assert ensemble_groups(cfgs, 2) == [(0, 1), (2, 3), (4,)]
    cfgs[1] = resolve_config(**OPTS, seed=1, shrink=True, out_dir=str(tmp_path / "1"))
    assert ensemble_groups(cfgs, 4) == [(0, 2, 3, 4), (1,)]
    with pytest.raises(ValueError, match="ensemble must be an integer >= 1"):
        reproduce("bmrs-table1", tmp_path / "x", ensemble=0, **opts)
