"""End-to-end tests of ``bayesprune.experiments.cli.main`` in-process, with tiny settings (digits, 1 epoch)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from bayesprune.experiments import cli, training
from bayesprune.experiments.training import run_dir_name

TINY = ["--model", "mlp", "--width", "16", "--extra-layers", "0", "--epochs", "1", "--quiet", "--device", "cpu"]


@pytest.fixture(autouse=True)
def _no_benchmark(monkeypatch):
    """The size/speed benchmark at the end of a run is timing, not logic: skip it here."""
    monkeypatch.setattr(training, "_size_speed", lambda *a, **k: None)


#: the default rule of `bayesprune run` (BMRS_N at the paper's prior odds) is part of the run directory name
GROUP = "mlp-digits-bmrs_n-t-0.919"
ROW = "BMRS_N (dF ≥ -0.919)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of a tiny continuous run (bmrs_n), shared by the tests."""
    out = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    mp.setattr(training, "_size_speed", lambda *a, **k: None)
    try:
        rc = cli.main(["run", *TINY, "--finetune-epochs", "1", "--seeds", "0", "1", "--out-dir", str(out)])
        assert rc == 0
    finally:
        mp.undo()
    return out


def test_run_layout_and_output(runs, capsys):
    group = runs / GROUP
    for seed in (0, 1):
        d = group / f"seed{seed}"
        for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
            assert (d / f).exists(), d / f
        assert json.loads((d / "config.json").read_text())["seed"] == seed
    # re-running is a resume: the finished runs are not trained again and the table is printed
    assert cli.main(["run", *TINY, "--finetune-epochs", "1", "--seeds", "0", "1", "--out-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "test acc %" in out and "param compression %" in out and "structure compression %" in out
    assert "rule: BMRS_N: dF + log(prior odds 2.507) >= 0 (dF >= -0.9189)" in out  # the rule that decided
    acc0 = json.loads((group / "seed0" / "summary.json").read_text())["test_acc"]
    assert f"{100 * acc0:.2f}" in out


def test_run_dir_name():
    assert run_dir_name("lenet5", "mnist", "bmrs_u", 4) == "lenet5-mnist-bmrs_u-p4"
    assert run_dir_name("lenet5", "mnist", "bmrs_n", 4) == "lenet5-mnist-bmrs_n"
    assert run_dir_name("tv:resnet18", "cifar10", "l2") == "tv_resnet18-cifar10-l2"
    # a threshold is part of the name (as in `reproduce`), so exact and thresholded runs differ
    assert run_dir_name("lenet5", "mnist", "bmrs_n", threshold=-0.9189385332046727) == "lenet5-mnist-bmrs_n-t-0.919"
    assert run_dir_name("mlp", "mnist", "bmrs_u", 4, 0.5) == "mlp-mnist-bmrs_u-p4-t0.500"
    # another KL weighting is another experiment: its own directory (dense has no KL)
    assert run_dir_name("lenet5", "mnist", "bmrs_n", kl_weighting="elbo") == "lenet5-mnist-bmrs_n-klelbo"
    assert run_dir_name("lenet5", "mnist", "bmrs_n", kl_weighting="mean") == "lenet5-mnist-bmrs_n"
    assert run_dir_name("lenet5", "mnist", "dense", kl_weighting="elbo") == "lenet5-mnist-dense"


def test_table_markdown_and_csv(runs, tmp_path, capsys):
    prefix = tmp_path / "t1"
    assert cli.main(["table", str(runs), "--out", str(prefix)]) == 0
    md = capsys.readouterr().out
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | mlp / digits |"
    assert lines[1] == "|---|---|"
    assert lines[2].startswith(f"| {ROW} |") and lines[2].endswith("(n=2) |")
    assert Path(f"{prefix}.md").read_text().strip() == md.split("wrote")[0].strip()
    rows = list(csv.DictReader(open(f"{prefix}.csv")))
    bm = next(r for r in rows if r["method"] == ROW)
    summaries = [json.loads((runs / GROUP / f"seed{s}" / "summary.json").read_text()) for s in (0, 1)]
    accs = [100 * s["test_acc"] for s in summaries]
    comps = [100 * s["param_compression"] for s in summaries]
    assert int(bm["n"]) == 2
    assert float(bm["accuracy_mean"]) == pytest.approx(sum(accs) / 2, rel=1e-5)
    assert float(bm["compression_mean"]) == pytest.approx(sum(comps) / 2, rel=1e-5, abs=1e-9)
    sd = math.sqrt(sum((a - sum(accs) / 2) ** 2 for a in accs))  # ddof=1 with n=2
    assert float(bm["accuracy_std"]) == pytest.approx(sd, rel=1e-5, abs=1e-9)


def test_plot(runs, tmp_path, capsys):
    out = tmp_path / "plots"
    assert cli.main(["plot", str(runs / GROUP / "seed0"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and "BMRS_U-4" in text
    for f in ("structure_histograms.png", "spearman.png", "spearman.csv"):
        assert (out / f).stat().st_size > 0
    rows = list(csv.reader(open(out / "spearman.csv")))
    assert rows[0] == ["criterion", "SNR", "E[θ]", "L2", "BMRS_N", "BMRS_U-8", "BMRS_U-4"]
    assert float(rows[1][1]) == pytest.approx(1.0)


def test_sweep(tmp_path, capsys):
    rc = cli.main(["sweep", *TINY, "--criteria", "bmrs_n", "--points", "0", "0.5",
                  "--sweep-finetune-epochs", "0", "--out-dir", str(tmp_path)])
    assert rc == 0
    group = tmp_path / "mlp-digits-sweep"
    sw = json.loads((group / "seed0" / "sweep.json").read_text())
    assert [p["target"] for p in sw["points"]] == [0.0, 0.5]
    assert "bmrs_n" in sw["stops"]
    assert sw["train_wall_time_s"] > 0 and sw["sweep_wall_time_s"] > 0
    assert (group / "accuracy_vs_compression.png").stat().st_size > 0
    out = capsys.readouterr().out
    assert "bmrs_n stop" in out
    # the sweep directory is skipped by `table` (its training phase is not a table row)
    assert cli.main(["table", str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_bf_run_and_table(tmp_path, capsys):
    args = ["bf-run", "--model", "fcn", "--dataset", "digits", "--epochs", "1", "--sparsity", "0.5",
            "--likelihood-batches", "2", "--seeds", "0", "--quiet", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert cli.main([*args, "--mode", "none", "random"]) == 0
    assert cli.main([*args, "--mode", "magnitude", "--no-gated"]) == 0
    root = tmp_path / "bf-fcn-digits"
    d = root / "random-bayes-r0.5" / "seed0"
    s = json.loads((d / "summary.json").read_text())
    assert s["kind"] == "bayes_factor" and s["mode"] == "random" and s["gated"] is True
    assert s["final_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert {"test_acc", "dead_structures", "structures"} <= set(s)
    hist = json.loads((d / "history.json").read_text())
    assert len(hist["train_loss"]) == 1 and len(hist["log_bf"]) == 1 and hist["pruned"] == [True]
    assert (d / "curves.png").stat().st_size > 0
    assert (root / "none" / "seed0" / "summary.json").exists()
    assert (root / "magnitude-plain-r0.5" / "seed0" / "summary.json").exists()
    capsys.readouterr()
    # resumable at run granularity: existing runs are skipped
    assert cli.main([*args, "--mode", "random"]) == 0
    assert "skip" in capsys.readouterr().out
    prefix = tmp_path / "bf"
    assert cli.main(["table", str(root), "--out", str(prefix)]) == 0
    md = Path(f"{prefix}.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| sparsity"))
    assert header == "| sparsity r | fcn / digits: unpruned | fcn / digits: Bayes random | fcn / digits: magnitude |"
    assert any(line.startswith("| 0.5 |") for line in md.splitlines())
    rows = list(csv.DictReader(open(f"{prefix}.csv")))
    rnd = next(r for r in rows if r["variant"] == "Bayes random")
    assert float(rnd["accuracy_mean"]) == pytest.approx(100 * s["test_acc"], rel=1e-5)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["run", "--dataset", "nope"], "cifar10"),
        (["run", "--model", "nope"], "mlp, lenet5"),
        (["run", "--method", "nope"], "bmrs_n"),
        (["bf-run", "--model", "mlp"], "fcn"),
    ],
)
def test_unknown_names(argv, needle, capsys, tmp_path):
    assert cli.main([*argv, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and needle in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, option",
    [
        (["run", "--threshold", "nan"], "--threshold"),
        (["run", "--threshold", "inf"], "--threshold"),
        (["run", "--prior-odds", "nan"], "--prior-odds"),
        (["run", "--prior-odds", "0"], "--prior-odds"),
        (["run", "--method", "bmrs_u", "--precision", "nan"], "--precision"),
        (["run", "--method", "l2", "--compression", "nan"], "compression"),
        (["run", "--threshold", "-1", "--prior-odds", "2"], "prior_odds"),
    ],
)
def test_non_finite_or_conflicting_rule_options_are_refused(argv, option, capsys, tmp_path):
    assert cli.main([*argv, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and option in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


def test_missing_data_dir(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    rc = cli.main(["run", "--dataset", "mnist", "--data-dir", str(missing), "--epochs", "1", "--out-dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and str(missing) in err and "Traceback" not in err


def test_corrupt_data_file(tmp_path, capsys):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"not an idx file")
    rc = cli.main(["run", "--dataset", "mnist", "--data-dir", str(tmp_path), "--epochs", "1", "--out-dir", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "error:" in err and str(folder) in err and "IDX" in err and "Traceback" not in err


def test_diverged_and_interrupted(monkeypatch, tmp_path, capsys):
    # --lr 1e30: a finite but absurd loss in epoch 1 is divergence; no checkpoint exists and the
    # message says so; the failed start leaves nothing, so the corrected command runs
    assert cli.main(["run", *TINY, "--lr", "1e30", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: training diverged: loss exceeds" in err and "in epoch 1" in err
    assert "no checkpoint was written" in err and "last good checkpoint" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert cli.main(["run", *TINY, "--finetune-epochs", "0", "--out-dir", str(tmp_path)]) == 0
    capsys.readouterr()

    def interrupt(cfg, progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "run_continuous", interrupt)
    assert cli.main(["run", *TINY, "--out-dir", str(tmp_path)]) == 130
    err = capsys.readouterr().err
    assert "same command" in err and "resume" in err


def test_bad_values(tmp_path, capsys):
    assert cli.main(["run", *TINY, "--lr", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "lr" in capsys.readouterr().err
    assert cli.main(["bf-run", "--sparsity", "1.5", "--out-dir", str(tmp_path)]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert cli.main(["table", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_bf_run_interrupted_resumes_from_its_checkpoint(monkeypatch, tmp_path, capsys):
    """Ctrl-C after epoch 1 of 2 keeps checkpoint.pt; the same command goes on from epoch 2 and
    gives the history an uninterrupted run gives; checkpoint.pt is gone once summary.json exists."""
    from bayesprune.experiments import bf_training as bayes_factor

    args = ["bf-run", "--model", "fcn", "--dataset", "digits", "--epochs", "2", "--sparsity", "0.5",
            "--mode", "magnitude", "--likelihood-batches", "2", "--seeds", "0", "--quiet", "--device", "cpu"]
    assert cli.main([*args, "--out-dir", str(tmp_path / "whole")]) == 0
    real_save = bayes_factor._save_checkpoint

    def save_then_interrupt(path, epoch, *rest):
        real_save(path, epoch, *rest)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(bayes_factor, "_save_checkpoint", save_then_interrupt)
    out = tmp_path / "cut"
    d = out / "bf-fcn-digits" / "magnitude-bayes-r0.5" / "seed0"
    assert cli.main([*args, "--out-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(d) in err and "resume" in err
    assert (d / "checkpoint.pt").exists() and not (d / "summary.json").exists()
    monkeypatch.setattr(bayes_factor, "_save_checkpoint", real_save)
    assert cli.main([*args, "--out-dir", str(out)]) == 0
    assert f"resume {d} from its checkpoint" in capsys.readouterr().out
    assert not (d / "checkpoint.pt").exists()
    whole = tmp_path / "whole" / "bf-fcn-digits" / "magnitude-bayes-r0.5" / "seed0"
    s_cut, s_whole = (json.loads((p / "summary.json").read_text()) for p in (d, whole))
    assert s_cut["resumed_from_epoch"] == 1 and s_whole["resumed_from_epoch"] == 0
    assert s_cut["test_acc"] == s_whole["test_acc"] and s_cut["final_log_bf"] == s_whole["final_log_bf"]
    h_cut, h_whole = (json.loads((p / "history.json").read_text()) for p in (d, whole))
    for key in ("train_loss", "val_loss", "val_acc", "log_bf", "sparsity"):
        assert h_cut[key] == h_whole[key], key
    assert s_cut["wall_time_s"] >= h_cut["seconds"][0]  # the epoch run before the interruption counts


def test_bf_run_spare_output_leaves_the_output_layer_whole(tmp_path, capsys):
    args = ["bf-run", "--model", "fcn", "--dataset", "digits", "--epochs", "1", "--sparsity", "0.99",
            "--mode", "magnitude", "--no-gated", "--seeds", "0", "--quiet", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert cli.main(args) == 0
    assert cli.main([*args, "--spare-output"]) == 0
    root = tmp_path / "bf-fcn-digits"
    full = json.loads((root / "magnitude-plain-r0.99" / "seed0" / "history.json").read_text())
    spared_dir = root / "magnitude-plain-r0.99-spare-output" / "seed0"
    spared = json.loads((spared_dir / "history.json").read_text())
    s = json.loads((spared_dir / "summary.json").read_text())
    assert s["config"]["spare_output"] is True
    layers_full, layers_spared = full["layer_sparsity"][-1], spared["layer_sparsity"][-1]
    out_layer = list(layers_full)[-1]
    assert layers_full[out_layer] == pytest.approx(0.99, abs=0.01)  # by default the output layer is cut too
    assert out_layer not in layers_spared and list(layers_spared) == list(layers_full)[:-1]
    assert all(v == pytest.approx(0.99, abs=0.01) for v in layers_spared.values())
    assert s["dead_per_layer"][out_layer]["dead"] == 0
    capsys.readouterr()
    assert cli.main(["table", str(tmp_path)]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| sparsity"))
    assert header.endswith("| fcn / digits: magnitude | fcn / digits: magnitude (output spared) |")
