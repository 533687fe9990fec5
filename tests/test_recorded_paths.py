"""Run files record portable paths: no absolute path of the machine in config.json or summary.json."""

import json
import os

import bayesprune.experiments.rundir as files
import bayesprune.experiments.training as tr


def test_portable_path_relative_under_cwd_only(tmp_path, monkeypatch):
    work = tmp_path / "work" / "main"
    (work / "runs").mkdir(parents=True)
    (tmp_path / "work" / "shared").mkdir()
    monkeypatch.chdir(work)
    assert files.portable_path(work / "runs" / "a") == "runs/a"
    # outside the working directory (even next to it): kept absolute, as the user gave it, so a
    # run directory outside the project never reads as a path relative to some other folder
    beside = tmp_path / "work" / "shared" / "datasets"
    assert files.portable_path(beside) == beside.as_posix()
    far = tmp_path / "elsewhere"
    assert files.portable_path(far) == far.as_posix()
    assert files.portable_path("relative/given") == "relative/given"
    assert files.portable_path(None) is None
    rec = files.recorded({"out_dir": str(work / "runs" / "a"), "data_dir": None, "lr": 0.1})
    assert rec == {"out_dir": "runs/a", "data_dir": None, "lr": 0.1}


def test_run_with_absolute_out_dir_records_it_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "r"
    cfg = tr.resolve_config(dataset="digits", model="mlp", width=16, extra_layers=0, epochs=1, finetune_epochs=0,
                            batch_size=256, method="bmrs_n", out_dir=str(out), device="cpu")
    summary = tr.run_continuous(cfg, progress=False)
    written = [json.loads((out / "config.json").read_text()), json.loads((out / "summary.json").read_text())["config"]]
    for cfg_json in written + [summary["config"]]:
        assert cfg_json["out_dir"] == "runs/r"
        assert not any(isinstance(v, str) and os.path.isabs(v) for v in cfg_json.values())
    # the finished run is found again from the relative record: a second call reads it, rewrites nothing
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = tr.run_continuous(cfg, progress=False)
    assert again["test_acc"] == summary["test_acc"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
