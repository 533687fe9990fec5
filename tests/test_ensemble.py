"""experiments/ensemble.py: K runs of one small network trained as one batched ensemble give each
member the numbers of its single run (run_continuous on its own).

Unit level (one batched epoch of two steps against each member's own training._train_epoch from
the same state): the logits, the gradients, the Adam state and the parameters after the updates,
the epoch's mean losses and the generator state after it, for the MLP and LeNet5 with noise.
Run level: the summaries and metric files of an ensemble of three runs (two seeds, two methods)
equal those of the three single runs except times; a run interrupted on its own resumes inside
an ensemble to the uninterrupted numbers; a member whose run fails (its directory locked) fails
alone; batched epochs falling back to the members' own code give the same numbers too.
reproduce: --ensemble K and --ensemble auto give the summaries of --ensemble 1 (up to times);
auto trains batched when the probe's (injected) timer finds the ensemble faster and single runs
otherwise, printing the measured ratio and recording it in every summary; the probe's size
follows the free memory, it refuses what cannot be batched; bad --ensemble values are named.
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


def _member(model_name: str, seed: int, data, **extra):
    cfg = resolve_config(model=model_name, seed=seed, device="cpu", **extra)
    training._seed_all(seed)
    model, _ = training._build(cfg, data, CPU)
    return cfg, model, training._optimizer(model, cfg), torch.get_rng_state()


@pytest.mark.parametrize("model_name, extra", [("mlp", {}), ("lenet5", {}), ("mlp", {"kl_weighting": "elbo", "kl_scale": 7.0})])
def test_one_batched_epoch_equals_each_members_own(model_name, extra):
    splits = load_dataset("digits", seed=0)
    small = ImageTensorDataset(splits.train.images[:24], splits.train.labels[:24])  # steps of 16 and 8
    members, singles, logits = [], [], []
    for seed in (0, 3):
        cfg, model, opt, rng = _member(model_name, seed, splits, **extra)
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
            # 1e-5: 1 % of one Adam step (lr 1e-3); float rounding of the grouped convolution, which
            # Adam's g / sqrt(v) amplifies where v is tiny, reached 1.2e-6 on an AMD EPYC (oneDNN)
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-5), name
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name
            s, t = opt.state[p], twin_opt.state[q]
            assert float(s["step"]) == float(t["step"]) == 2
            assert torch.allclose(s["exp_avg"], t["exp_avg"], rtol=1e-4, atol=1e-8), name
            assert torch.allclose(s["exp_avg_sq"], t["exp_avg_sq"], rtol=1e-4, atol=1e-12), name
        assert all(not torch.equal(p, p0) for p, p0 in zip(model.parameters(), start[k]))  # the updates were real


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in TIMES and k not in ("out_dir", "ensemble")}
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


TABLE = dict(seeds=[0, 1], epochs=1, finetune_epochs=0, datasets=["digits"], models=["mlp"], progress=False, device="cpu",
             width=16, measure_latency=False,
             methods=(("bmrs_n", None),))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """reproduce's LocalEngine(1) gives a run every usable core; here one (conftest's), as the
    tiny runs of these tests are much slower on two threads of a loaded machine."""
    from bayesprune.experiments import engines

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # LocalEngine(1) of an earlier test module may have left more
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engines, "usable_cores", lambda: 1)
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def single_table(tmp_path_factory):
    from bayesprune.experiments.reproduce import reproduce

    root = tmp_path_factory.mktemp("table")
    one = reproduce("bmrs-table1", root / "single", ensemble=1, **TABLE)
    assert not one["failures"]
    assert all("ensemble" not in s for s in one["summaries"])  # --ensemble 1 records nothing
    return {Path(s["config"]["out_dir"]).relative_to(root / "single"): s for s in one["summaries"]}


def _same_table(got, root, by_dir):
    assert len(by_dir) == len(got["summaries"]) == 4  # 2 seeds x (bmrs_n, then l2 at bmrs_n's compression)
    for s in got["summaries"]:
        _same(s, by_dir[Path(s["config"]["out_dir"]).relative_to(root)])


def test_reproduce_with_ensembles_gives_the_single_runs_tables(single_table, tmp_path):
    from bayesprune.experiments.reproduce import ensemble_groups, ensemble_sizes, reproduce

    four = reproduce("bmrs-table1", tmp_path / "ensemble", ensemble=4, **TABLE)
    assert not four["failures"]
    _same_table(four, tmp_path / "ensemble", single_table)
    assert all(s["ensemble"] == {"size": 2, "probe_ratio": None} for s in four["summaries"])  # forced: no probe
    cfgs = [resolve_config(**OPTS, seed=s, out_dir=str(tmp_path / str(s))) for s in range(5)]
    assert ensemble_groups(cfgs, 2) == [(0, 1), (2, 3), (4,)]
    cfgs[1] = resolve_config(**OPTS, seed=1, shrink=True, out_dir=str(tmp_path / "1"))
    assert ensemble_groups(cfgs, 4) == [(0, 2, 3, 4), (1,)]
    # auto's sizes: at most 16 members, enough ensembles for the engine's parallel tasks
    assert ensemble_sizes([21, 21], 2) == [11, 11]  # 16 at most: 11 + 10 each
    assert ensemble_sizes([21], 2) == [11] and ensemble_sizes([14], 2) == [7] and ensemble_sizes([14], 1) == [14]
    assert ensemble_sizes([40], 1) == [14] and ensemble_sizes([3, 5], 4) == [2, 3] and ensemble_sizes([2], 8) == [1]
    assert ensemble_sizes([10], 1, most=4) == [4]
    for bad in (0, -1, True, "4", 2.0):
        with pytest.raises(ValueError, match="ensemble must be 'auto' or an integer >= 1"):
            reproduce("bmrs-table1", tmp_path / "x", **dict(TABLE, ensemble=bad))


class _Timer:
    """A probe timer that runs the work and says the ``faster`` side took 1 s, the other 3 s."""

    def __init__(self, faster: str):
        self.faster, self.kinds = faster, []

    def __call__(self, kind, work):
        work()
        self.kinds.append(kind)
        return 1.0 if kind == self.faster else 3.0


@pytest.mark.parametrize("faster", ["ensemble", "single"])
def test_auto_trains_batched_where_the_probe_finds_it_faster(single_table, tmp_path, monkeypatch, capsys, faster):
    from bayesprune.experiments.reproduce import reproduce

    calls, real = [], ensemble.run_ensemble
    monkeypatch.setattr(ensemble, "run_ensemble", lambda cfgs, **kw: calls.append(len(cfgs)) or real(cfgs, **kw))
    timer = _Timer(faster)
    got = reproduce("bmrs-table1", tmp_path, **dict(TABLE, progress=True), probe_timer=timer)
    assert not got["failures"]
    _same_table(got, tmp_path, single_table)  # the probe changed no run's numbers
    # one probe per stage (bmrs_n, then l2), each 3 timed passes of each side
    assert timer.kinds.count("single") == timer.kinds.count("ensemble") == 2 * ensemble.PROBE_REPEATS
    batched = faster == "ensemble"
    ratio = 3.0 if batched else round(1 / 3, 4)
    assert calls == ([2, 2] if batched else [])  # what trained: two ensembles of 2, or eight single runs
    for s in got["summaries"]:
        assert s["ensemble"] == {"size": 2 if batched else 1, "probe_ratio": ratio}
        on_disk = json.loads((Path(s["config"]["out_dir"]) / "summary.json").read_text())
        assert on_disk["ensemble"] == s["ensemble"]
    out = capsys.readouterr().out
    assert f"ensemble probe mlp/digits, 2 runs: 2 single runs 3.000 s, one ensemble of 2 1.000 s" in out or not batched
    assert f"throughput {3.0 if batched else 1 / 3:.2f}x -> {'batched: ensembles of 2' if batched else 'single runs'}" in out
    # a second call finds every run finished: no probe, the summaries (and the recorded choice) as they are
    again = reproduce("bmrs-table1", tmp_path, **TABLE, probe_timer=_Timer("ensemble"))
    assert sorted(json.dumps(s, sort_keys=True) for s in again["summaries"]) == \
        sorted(json.dumps(s, sort_keys=True) for s in got["summaries"])


def test_probe_sizes_to_the_memory_and_refuses_what_it_cannot_batch(tmp_path, monkeypatch):
    cfgs = [resolve_config(**OPTS, seed=s, out_dir=str(tmp_path / str(s))) for s in range(3)]
    p = ensemble.probe(cfgs, steps=2, repeats=1)
    assert p.error is None and p.size == 3 and p.steps == 2 and p.single_s > 0 and p.ensemble_s > 0
    assert p.ratio == pytest.approx(p.single_s / p.ensemble_s)
    splits = training.load_splits(cfgs[0])
    training._seed_all(0)
    model, _ = training._build(cfgs[0], splits, CPU)
    images, labels = splits.train.images, splits.train.labels
    data = images.nelement() * images.element_size() + labels.nelement() * labels.element_size()
    params = sum(p.nelement() * 4 for p in model.parameters())
    acts = [o.nelement() * 4 for o in _module_outputs(model, splits.train.images[:16])]
    assert len(acts) == 8  # the MLP: Flatten, 3 Linear, 2 noise layers, 2 Tanh
    per_member = data + 8 * params + 3 * sum(acts)
    monkeypatch.setattr(ensemble, "_free_memory", lambda device: 2 * 2 * per_member + 1)  # half of it, 2 tasks: 2 members
    p = ensemble.probe(cfgs, steps=2, repeats=1)
    assert (p.size, p.max_members, p.error) == (2, 2, None)
    p = ensemble.probe(cfgs, steps=2, repeats=1, share=2)
    assert p.error is not None and "memory" in p.error and p.ratio is None and not p.batched
    monkeypatch.undo()
    element = [resolve_config(**OPTS, seed=s, sharing="element", out_dir=str(tmp_path / f"e{s}")) for s in range(2)]
    p = ensemble.probe(element, steps=2, repeats=1)
    assert "sharing 'element' is not supported" in p.error and not p.batched


def _module_outputs(model, x):
    outs = []
    hooks = [m.register_forward_hook(lambda _m, _i, o: outs.append(o)) for m in model.modules() if m is not model]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return outs


def test_cli_ensemble_values(tmp_path, monkeypatch, capsys):
    import bayesprune.experiments.reproduce as rep
    from bayesprune.experiments.cli import main

    seen = {}
    monkeypatch.setattr(rep, "reproduce", lambda name, out, **kw: seen.update(kw) or {"wall_time_s": 0.0})
    base = ["reproduce", "bmrs-table1", "--datasets", "digits", "--jobs", "1", "--out-dir", str(tmp_path)]
    main(base)
    assert seen["ensemble"] == rep.ENSEMBLE_AUTO == "auto"  # the default
    for value, parsed in (("auto", "auto"), ("1", 1), ("14", 14)):
        main(base + ["--ensemble", value])
        assert seen["ensemble"] == parsed
    capsys.readouterr()
    for bad in ("0", "-2", "foo", "1.5"):
        assert main(base + ["--ensemble", bad]) == 2
        err = capsys.readouterr().err
        assert f"argument --ensemble: expected 'auto' or an integer >= 1 (1: single runs), got {bad!r}" in err


def test_the_choice_is_recorded_unless_the_run_directory_is_held(tmp_path, capsys):
    from bayesprune.experiments.reproduce import _record

    cfg = resolve_config(**OPTS, seed=0, out_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"test_acc": 0.5}))
    lock = RunLock(tmp_path / "run").acquire()
    summary = {"test_acc": 0.5}
    try:
        _record(cfg, summary, {"size": 3, "probe_ratio": 1.5})
    finally:
        lock.release()
    assert "the ensemble choice was not recorded (RunLockedError" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary == {"test_acc": 0.5}
    _record(cfg, summary, {"size": 3, "probe_ratio": 1.5})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary == \
        {"test_acc": 0.5, "ensemble": {"size": 3, "probe_ratio": 1.5}}
