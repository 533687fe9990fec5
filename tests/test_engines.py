"""Engines of `reproduce`/`sweep`: the Ray engine (on a local Ray the module starts once, 2 CPUs)
writes the same run directories as the local process pool; a failed run is reported with its
error while the others finish; an interrupted run resumes to the uninterrupted numbers."""

from __future__ import annotations

import copy
import json
import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray engine's tests need the 'ray' extra (requirements-dev.txt pins it)")

from bayesprune.experiments import cli, engines  # noqa: E402
from bayesprune.experiments import reproduce as rep  # noqa: E402
from bayesprune.experiments import training as tr  # noqa: E402
from bayesprune.experiments.engines import LocalEngine, RayEngine  # noqa: E402
from bayesprune.experiments.rundir import RunLock  # noqa: E402

TINY = dict(dataset="digits", model="mlp", width=16, extra_layers=0, epochs=1, finetune_epochs=1, device="cpu")
METHODS = ("bmrs_n", "snr")


def _configs(root: Path) -> list:
    """Two tiny runs and a third one in a directory that ``_busy`` locks (it must fail)."""
    cfgs = [tr.resolve_config(method=m, out_dir=str(root / m), **TINY) for m in METHODS]
    return cfgs + [replace(cfgs[0], out_dir=str(root / "busy"))]


def _busy(cfg) -> RunLock:
    """The lock of ``cfg``'s run directory, held by this process (as if another run were in it)."""
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    return RunLock(cfg.out_dir)


def _is_busy_error(outcome) -> bool:
    return (not outcome.ok and outcome.result is None and outcome.config.out_dir.endswith("busy")
            and outcome.error.startswith(f"RunLockedError: run directory {outcome.config.out_dir} is in use by process {os.getpid()}")
            and "acquire" in outcome.traceback)


def _untimed(summary: dict) -> dict:
    """A summary without what depends on the clock or on where it was written."""
    s = copy.deepcopy(summary)
    s.pop("wall_time_s", None)
    s["config"].pop("out_dir")
    if s.get("size_speed"):
        s["size_speed"].pop("latency_ms")
    return s


def _metrics(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time")
    return rows


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    """The runs through the local engine, 2 processes of 1 thread each (forked before Ray starts)."""
    root = tmp_path_factory.mktemp("local")
    cfgs = _configs(root)
    with pytest.MonkeyPatch.context() as mp, _busy(cfgs[2]):
        mp.setattr(engines, "usable_cores", lambda: 2)  # 1 thread per run, as the Ray tasks have
        outcomes = sorted(LocalEngine(2).map(rep._run_one, cfgs), key=lambda o: o.index)
    return cfgs, outcomes


@pytest.fixture(scope="module")
def ray_engine(local_runs):
    """One local Ray (2 CPUs) for the module, started and shut down by the engine itself."""
    engine = RayEngine(num_cpus_per_run=1, num_cpus=2)
    with engine:
        yield engine
    assert not ray.is_initialized()  # the engine shut down the Ray it started


def test_ray_runs_equal_local_runs_and_a_failed_run_is_reported(local_runs, ray_engine, tmp_path):
    local_cfgs, local = local_runs
    cfgs = _configs(tmp_path)
    with _busy(cfgs[2]):
        seen = list(ray_engine.map(rep._run_one, cfgs))
    assert sorted(o.index for o in seen) == [0, 1, 2]
    by_index = {o.index: o for o in seen}
    for outcomes in (local, [by_index[i] for i in range(3)]):
        assert [o.ok for o in outcomes] == [True, True, False], [o.error for o in outcomes]
        assert _is_busy_error(outcomes[2]), outcomes[2].error
    assert not (Path(cfgs[2].out_dir) / "summary.json").exists()
    for i, method in enumerate(METHODS):
        ours, theirs = by_index[i].result, local[i].result
        assert ours["config"]["method"] == method and ours["config"]["out_dir"] == cfgs[i].out_dir
        assert _untimed(ours) == _untimed(theirs), method
        assert _metrics(cfgs[i].out_dir) == _metrics(local_cfgs[i].out_dir)
        assert json.loads((Path(cfgs[i].out_dir) / "summary.json").read_text()) == json.loads(json.dumps(ours))
    # finished runs are skipped: the summaries come back as written, the files untouched
    written = {c.out_dir: (Path(c.out_dir) / "summary.json").stat().st_mtime_ns for c in cfgs[:2]}
    again = sorted(ray_engine.map(rep._run_one, cfgs[:2]), key=lambda o: o.index)
    assert [o.result for o in again] == json.loads(json.dumps([by_index[0].result, by_index[1].result]))
    assert {c.out_dir: (Path(c.out_dir) / "summary.json").stat().st_mtime_ns for c in cfgs[:2]} == written


def test_ray_resumes_an_interrupted_run_to_the_uninterrupted_numbers(local_runs, ray_engine, tmp_path, monkeypatch):
    local_cfgs, local = local_runs
    cfg = replace(local_cfgs[0], out_dir=str(tmp_path / "interrupted"))
    original, calls = tr._train_epoch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # killed during the second (fine-tuning) epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tr, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):  # an interruption is not a failed run: it stops the engine
        list(LocalEngine(1).map(rep._run_one, [cfg]))
    monkeypatch.setattr(tr, "_train_epoch", original)
    assert tr.load_checkpoint(Path(cfg.out_dir) / "checkpoint.pt")["epoch"] == 1
    assert not (Path(cfg.out_dir) / "summary.json").exists()
    (resumed,) = ray_engine.map(rep._run_one, [cfg])
    assert resumed.ok, resumed.traceback
    assert _untimed(resumed.result) == _untimed(local[0].result)
    assert _metrics(cfg.out_dir) == _metrics(local_cfgs[0].out_dir)


def test_sweep_cli_on_ray_equals_local(local_runs, ray_engine, tmp_path, capsys):
    args = ["sweep", "--model", "mlp", "--width", "16", "--extra-layers", "0", "--epochs", "1", "--device", "cpu",
            "--criteria", "snr", "--points", "0.5", "--sweep-finetune-epochs", "0", "--quiet"]
    assert cli.main([*args, "--out-dir", str(tmp_path / "local")]) == 0
    assert cli.main([*args, "--out-dir", str(tmp_path / "ray"), "--engine", "ray", "--cpus-per-run", "1"]) == 0
    assert ray.is_initialized()  # the command used the running Ray and left it running
    sweeps = []
    for where in ("local", "ray"):
        sweep = json.loads((tmp_path / where / "mlp-digits-sweep" / "seed0" / "sweep.json").read_text())
        for key in ("train_wall_time_s", "sweep_wall_time_s"):
            assert sweep.pop(key) > 0
        assert sweep["config"].pop("out_dir").startswith(str(tmp_path / where))
        sweeps.append(sweep)
    assert sweeps[0] == sweeps[1]
    assert [p["target"] for p in sweeps[1]["points"]] == [0.5] and 0 < sweeps[1]["points"][0]["test_acc"] <= 1


def test_resources_no_node_has_are_refused(ray_engine):
    gpus = ray.cluster_resources().get("GPU", 0.0)
    cfg = tr.resolve_config(out_dir="unused", **TINY)
    with pytest.raises(ValueError, match=r"num_gpus_per_run \(--gpus-per-run\) is .* no node of the Ray cluster has"):
        list(RayEngine(num_gpus_per_run=int(gpus) + 1).map(rep._run_one, [cfg]))
    with pytest.raises(ValueError, match=r"num_cpus_per_run \(--cpus-per-run\) is 3 but .*largest: 2"):
        list(RayEngine(num_cpus_per_run=3).map(rep._run_one, [cfg]))
    assert ray.is_initialized()  # refusing did not stop the module's Ray


def test_a_task_without_a_gpu_share_sees_no_gpu(ray_engine):
    (seen,) = ray_engine.map(partial(os.getenv, "CUDA_VISIBLE_DEVICES"), ["not set"])
    assert seen.ok and seen.result == ""  # so device "auto" trains on the CPU, not on a GPU Ray did not give


def test_cli_engine_options_reach_reproduce_and_bad_ones_are_refused(tmp_path, monkeypatch, capsys):
    seen = {}

    def fake(name, out, **kw):
        seen.update(kw)
        return {"summaries": [], "wall_time_s": 0.0, "failures": []}

    monkeypatch.setattr(rep, "reproduce", fake)
    base = ["reproduce", "bf-table1", "--out-dir", str(tmp_path), "--quiet"]
    cli.main([*base, "--engine", "ray", "--ray-address", "auto", "--cpus-per-run", "2", "--gpus-per-run", "0.25"])
    engine = seen["engine"]
    assert isinstance(engine, RayEngine)
    assert (engine.address, engine.num_cpus_per_run, engine.num_gpus_per_run) == ("auto", 2.0, 0.25)
    cli.main([*base, "--jobs", "3"])
    assert isinstance(seen["engine"], LocalEngine) and seen["engine"].jobs == 3
    for bad, message in (
        (["--engine", "ray", "--jobs", "2"], "--jobs applies to --engine local"),
        (["--gpus-per-run", "1"], "--gpus-per-run apply to --engine ray only"),
        (["--engine", "ray", "--cpus-per-run", "0"], "num_cpus_per_run must be a finite number > 0, got 0.0"),
        (["--engine", "ray", "--gpus-per-run", "1.5"], "num_gpus_per_run above 1 must be a whole number"),
        (["--engine", "dask"], "invalid choice: 'dask'"),
    ):
        assert cli.main([*base, *bad]) == 2, bad
        assert message in capsys.readouterr().err, bad


def test_failed_runs_make_the_command_fail_after_the_others(tmp_path, monkeypatch, capsys):
    """The local engine in this process: the failure is printed as it happens and listed at the end."""
    cfgs = _configs(tmp_path)[2:]  # the busy run only: it fails before training
    failures = []
    with _busy(cfgs[0]):
        assert engines.run_all(LocalEngine(1), rep._run_one, cfgs, progress=False, failures=failures) == [None]
    assert len(failures) == 1 and _is_busy_error(failures[0])
    assert f"[1/1] FAILED {cfgs[0].out_dir}: RunLockedError" in capsys.readouterr().err
    def finished(name, out, **kw):
        out.mkdir(parents=True, exist_ok=True)
        return {"summaries": [], "wall_time_s": 0.0, "failures": failures}

    monkeypatch.setattr(rep, "reproduce", finished)
    monkeypatch.setattr(cli, "_print_sweeps", lambda out, wall: 0)
    assert cli.main(["reproduce", "bmrs-posttrain", "--out-dir", str(tmp_path), "--jobs", "1", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "error: 1 run(s) failed" in err and f"{cfgs[0].out_dir}: RunLockedError: " in err


def test_missing_ray_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'bayesprune\[ray\]'"):
        RayEngine()
    assert cli.main(["reproduce", "bf-table1", "--engine", "ray", "--out-dir", str(tmp_path)]) == 2
    assert "the Ray engine needs Ray, which is not installed" in capsys.readouterr().err
    assert isinstance(engines.make_engine("local", jobs=2), LocalEngine)  # the local engine needs no Ray


def _threads_seen(_config) -> int:
    import torch

    return torch.get_num_threads()


def test_local_engine_in_process_keeps_the_callers_thread_count():
    """jobs=1 runs in this process: never with more threads than the caller set (a test suite at
    1 thread stays at 1), and the caller's setting is back after the runs."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        outcomes = list(LocalEngine(1).map(_threads_seen, [None, None]))
        assert [o.result for o in outcomes] == [1, 1]
        assert torch.get_num_threads() == 1
        cores = engines.usable_cores()
        torch.set_num_threads(cores + 1)  # more than the machine has: capped at its cores, then restored
        assert [o.result for o in LocalEngine(1).map(_threads_seen, [None])] == [cores]
        assert torch.get_num_threads() == cores + 1
    finally:
        torch.set_num_threads(before)
