"""`bayesprune reproduce`: end to end on the embedded digits data, skip/resume, L2 matching."""

import json

from bayesprune.experiments.cli import main
from bayesprune.reduction import REFERENCE_THRESHOLD
from bayesprune.experiments.results import load_sweeps
from bayesprune.experiments.reproduce import reproduce


def test_bmrs_table1_end_to_end_and_skips_finished_runs(tmp_path, capsys):
    kw = dict(seeds=[0], epochs=2, models=["mlp"], datasets=["digits"], width=16, progress=False, threshold=REFERENCE_THRESHOLD)
    res = reproduce("bmrs-table1", tmp_path, **kw)
    names = sorted(p.parent.parent.name for p in tmp_path.rglob("summary.json"))
    assert names == sorted(
        f"mlp-digits-{m}" for m in ("none", "etheta", "snr", "bmrs_n", "bmrs_u-p8", "bmrs_u-p4", "dense", "bmrs_n-t-0.919", "l2")
    )
    by_dir = {p.parent.parent.name: json.loads(p.read_text()) for p in tmp_path.rglob("summary.json")}
    # --epochs 2 without --finetune-epochs fine-tunes min(10, 2) epochs
    assert by_dir["mlp-digits-none"]["config"]["finetune_epochs"] == 2
    # L2 is pruned to the compression the thresholded BMRS_N run reached (same seed)
    target = by_dir["mlp-digits-bmrs_n-t-0.919"]["param_compression"]
    assert by_dir["mlp-digits-l2"]["config"]["compression"] == target
    assert by_dir["mlp-digits-l2"]["param_compression"] >= target - 1e-9
    # finished runs are skipped: a second call returns the same summaries without training
    again = reproduce("bmrs-table1", tmp_path, **kw)
    assert [s["test_acc"] for s in again["summaries"]] == [s["test_acc"] for s in res["summaries"]]
    assert again["wall_time_s"] < res["wall_time_s"]
    # the CLI prints the Table 1 layout
    assert main(["table", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| method | mlp / digits |" in out and "BMRS_N (dF ≥ -0.919)" in out and "| L2 |" in out


def test_bf_table1_on_digits(tmp_path, capsys):
    code = main(["reproduce", "bf-table1", "--seeds", "0", "--epochs", "1", "--models", "fcn", "--datasets", "digits",
                 "--out-dir", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "Bayes magnitude" in out and "| 0.99 |" in out
    assert len(list(tmp_path.rglob("summary.json"))) == 21  # 5 r x 2 modes x 2 gates + unpruned


def test_jobs_default_one_run_per_core_on_cpu_and_bad_jobs_refused(tmp_path, monkeypatch, capsys):
    import os

    import bayesprune.experiments.reproduce as rep

    seen = {}

    def fake(name, out, **kw):
        seen.update(kw)
        out.mkdir(parents=True, exist_ok=True)
        return {"wall_time_s": 0.0}

    monkeypatch.setattr(rep, "reproduce", fake)
    main(["reproduce", "bf-table1", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert seen["jobs"] == len(os.sched_getaffinity(0))
    # the cores the process may use (taskset, cgroup cpusets), not every core of the machine
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert rep.usable_cores() == 1
    main(["reproduce", "bf-table1", "--device", "cpu", "--out-dir", str(tmp_path)])
    assert seen["jobs"] == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert rep.usable_cores() == 4
    main(["reproduce", "bf-table1", "--device", "cpu", "--jobs", "1", "--out-dir", str(tmp_path)])
    assert seen["jobs"] == 1
    assert main(["reproduce", "bf-table1", "--jobs", "0", "--out-dir", str(tmp_path)]) != 0
    assert "--jobs must be >= 1, got 0" in capsys.readouterr().err


def test_bmrs_posttrain_prints_curves_and_stop_points(tmp_path, monkeypatch, capsys):
    import bayesprune.experiments.reproduce as rep

    out = tmp_path / "bmrs-posttrain"
    kw = dict(seeds=[0], epochs=1, models=["mlp"], datasets=["digits"], width=16, sweep_points=[0.5, 0.9],
              sweep_criteria=["snr", "bmrs_n"], progress=False)
    real = rep.reproduce("bmrs-posttrain", out, **kw)
    # the CLI with --quiet: the (finished) sweeps are run through reproduce, then printed
    seen = {}

    def finished(name, out_dir, **cli_kw):
        seen.update(cli_kw)
        return real

    monkeypatch.setattr(rep, "reproduce", finished)
    assert main(["reproduce", "bmrs-posttrain", "--seeds", "0", "--jobs", "1", "--quiet", "--out-dir", str(tmp_path)]) == 0
    assert seen["progress"] is False
    printed = capsys.readouterr().out
    group = out / "mlp-digits-sweep"
    sweep = json.loads((group / "seed0" / "sweep.json").read_text())
    # the printed table is the sweep's: one row per target, one column per criterion, then the stop points
    assert "| target | snr | bmrs_n |" in printed
    for p in sweep["points"]:
        assert f"{100 * p['param_compression']:.1f} % / {100 * p['test_acc']:.2f} ± 0.00" in printed
    assert {f"| {100 * p['target']:g} % |" for p in sweep["points"]} == {"| 50 % |", "| 90 % |"}
    for label, stop in sweep["stops"].items():
        assert f"stop point of {label} (n=1): {100 * stop['param_compression']:.2f} %" in printed
    assert (out / "table.md").read_text().strip() in printed
    assert (group / "accuracy_vs_compression.png").stat().st_size > 0
    assert "## mlp / digits, post-training, 1 seed(s)" in printed
    # the loader both printers share: seeds in folder order, nothing for a group not yet finished
    assert load_sweeps(group) == [sweep]
    assert load_sweeps(tmp_path / "mlp-none-sweep") == []


def test_a_locked_run_is_reported_not_run(tmp_path, capsys):
    """reproduce takes the run directory lock of every run: a run another process holds is
    reported as failed (naming the holder) and not run; once free, the same call runs it."""
    import os

    from bayesprune.experiments.rundir import RunLock

    out = tmp_path / "bmrs-posttrain"
    kw = dict(seeds=[0], epochs=1, models=["mlp"], datasets=["digits"], width=16, sweep_points=[0.5],
              sweep_criteria=["snr"], progress=False)
    seed_dir = out / "mlp-digits-sweep" / "seed0"
    seed_dir.mkdir(parents=True)
    held = RunLock(seed_dir).acquire()
    res = reproduce("bmrs-posttrain", out, **kw)
    held.release()
    assert res["summaries"] == [] and len(res["failures"]) == 1
    assert f"RunLockedError: run directory {seed_dir} is in use by process {os.getpid()}" in res["failures"][0].error
    assert not (seed_dir / "sweep.json").exists() and not (seed_dir / "train").exists()
    assert "FAILED" in capsys.readouterr().err
    again = reproduce("bmrs-posttrain", out, **kw)
    assert again["failures"] == [] and (seed_dir / "sweep.json").exists()
