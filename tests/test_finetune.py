"""The dense fine-tune after pruning (experiments/finetune.py): it starts from exactly the shrunk
network's function, trains a plain network (no noise module, cross-entropy only), resumes to the
uninterrupted numbers, and its options are validated."""

from __future__ import annotations

import json
import math

import pytest
import torch

from bayesprune.experiments import cli, finetune
from bayesprune.experiments import training
from bayesprune.experiments.finetune import dense_dir_name, dense_start, pruning_config, schedule_factor
from bayesprune.experiments.reproduce import bmrs_table1_configs
from bayesprune.experiments.results import method_label, table1
from bayesprune.experiments.training import RunDir, evaluate, resolve_config, run_continuous
from bayesprune.noise import MultiplicativeNoise, noise_layers

# a tiny MLP on the embedded digits, one pruning epoch at a forced compression: seconds
TINY = dict(dataset="digits", model="mlp", width=12, extra_layers=0, epochs=1, finetune_epochs=1, batch_size=64,
            method="etheta", compression=0.5)


def _cfg(tmp_path, name="run", **over):
    return resolve_config(**{**TINY, "out_dir": str(tmp_path / name), "dense_finetune_epochs": 3, **over})


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dft")
    cfg = _cfg(tmp)
    return cfg, run_continuous(cfg, progress=False)


def test_starts_from_the_shrunk_networks_exact_function(finished):
    cfg, summary = finished
    noisy, small, example, splits, device = dense_start(cfg)
    assert any(int((n.mask == 0).sum()) for n in noise_layers(noisy)), "the pruning run removed nothing: no test"
    x = torch.stack([splits.test[i][0] for i in range(len(splits.test))])
    noisy.eval(), small.eval()
    with torch.no_grad():
        ref, out = noisy(x), small(x)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    # the start accuracy is the pruning run's reported test accuracy (evaluated on the noisy masked model)
    assert summary["start_test_acc"] == summary["pruned"]["test_acc"]
    # the small network holds exactly the parameters the pruning run reports as kept
    assert summary["params_kept"] == summary["pruned"]["params_kept"] == sum(p.numel() for p in small.parameters())
    assert math.isclose(summary["param_compression"], summary["pruned"]["param_compression"], rel_tol=1e-12)
    assert summary["size_speed"]["macs"]["ratio"] > 1.0


def test_the_finetuned_network_is_plain_and_trained(finished):
    cfg, summary = finished
    _, small, _, splits, device = dense_start(cfg)
    start = {k: v.clone() for k, v in small.state_dict().items()}
    rd = RunDir(cfg.out_dir + "/" + dense_dir_name(cfg))
    state = training.load_checkpoint(rd.checkpoint)
    small.load_state_dict(state["best"]["model"])
    assert not noise_layers(small) and not any(isinstance(m, MultiplicativeNoise) for m in small.modules())
    assert not any("bayes_noise" in k for k in state["model"])
    assert any(not torch.equal(start[k], v) for k, v in small.state_dict().items()), "the fine-tune changed nothing"
    # the reported accuracy is the best-validation checkpoint's, and the loss had no KL term
    assert evaluate(small, splits.test, device)[1] == summary["test_acc"]
    rows = [json.loads(line) for line in rd.metrics.read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3] and summary["best_epoch"] == max(rows, key=lambda r: r["val_acc"])["epoch"]
    assert all(r["train_loss"] == r["train_ce"] for r in rows)
    # cosine schedule: lr (1 + cos(pi e / F)) / 2 at epoch e = 0, 1, 2 of F = 3
    assert [r["lr"] for r in rows] == pytest.approx([cfg.lr * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)])
    assert summary["noise_layers"] == 0 and summary["kind"] == "dense_finetune"


def test_pruning_run_is_the_plain_run_and_is_reused(finished, tmp_path):
    cfg, summary = finished
    plain = json.loads((RunDir(cfg.out_dir).summary).read_text())
    assert plain["config"]["dense_finetune_epochs"] == 0 and plain["test_acc"] == summary["pruned"]["test_acc"]
    # another fine-tune of the same pruning run trains no pruning epoch again
    calls = []
    original = training._run_continuous
    try:
        training._run_continuous = lambda *a, **k: calls.append(a) or original(*a, **k)
        other = run_continuous(resolve_config(**{**TINY, "out_dir": cfg.out_dir, "dense_finetune_epochs": 1,
                                                 "dense_finetune_lr": 1e-3, "dense_finetune_schedule": "constant"}), progress=False)
    finally:
        training._run_continuous = original
    assert not calls and other["pruned"]["test_acc"] == plain["test_acc"]
    assert other["config"]["out_dir"].endswith("dense-ft1-lr0.001-constant")
    assert method_label(other["config"]) == "E[θ] + dense FT 1 (lr 0.001, constant)"
    # tables: its own row beside the pruning run's, the same compression
    t = table1([plain, summary])
    assert t.rows == ["E[θ]", "E[θ] + dense FT 3"]
    cells = [t.cells[(r, ("mlp", "digits"))].values["compression"][0] for r in t.rows]
    assert cells[0] == pytest.approx(cells[1], rel=1e-12)


def test_resume_gives_the_uninterrupted_numbers(finished, tmp_path):
    cfg, summary = finished
    cfg2 = _cfg(tmp_path)
    original = finetune._train_epoch
    count = {"n": 0}

    def interrupted(model, *a, **k):
        if not noise_layers(model):
            count["n"] += 1
            if count["n"] == 2:
                raise KeyboardInterrupt
        return original(model, *a, **k)

    finetune._train_epoch = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_continuous(cfg2, progress=False)
    finally:
        finetune._train_epoch = original
    rd = RunDir(cfg2.out_dir + "/" + dense_dir_name(cfg2))
    assert rd.checkpoint.exists() and not rd.summary.exists()
    resumed = run_continuous(cfg2, progress=False)
    for key in ("test_acc", "test_loss", "best_epoch", "best_val_acc", "start_test_acc", "params_kept"):
        assert resumed[key] == summary[key], key
    strip = lambda p: [{k: v for k, v in json.loads(x).items() if k != "epoch_time"} for x in p.read_text().splitlines()]  # noqa: E731
    assert strip(rd.metrics) == strip(RunDir(cfg.out_dir + "/" + dense_dir_name(cfg)).metrics)


def test_options_validate(tmp_path, capsys):
    with pytest.raises(ValueError, match="dense_finetune_epochs must be an integer >= 0"):
        resolve_config(dense_finetune_epochs=-1)
    with pytest.raises(ValueError, match="dense_finetune_lr must be a positive number"):
        resolve_config(dense_finetune_epochs=2, dense_finetune_lr=-1.0)
    with pytest.raises(ValueError, match="dense_finetune_lr needs dense_finetune_epochs"):
        resolve_config(dense_finetune_lr=1e-3)
    with pytest.raises(ValueError, match="unknown dense_finetune_schedule 'step'"):
        resolve_config(dense_finetune_epochs=2, dense_finetune_schedule="step")
    with pytest.raises(ValueError, match="method 'dense' .* --dense-finetune-epochs"):
        resolve_config(method="dense", dense_finetune_epochs=2)
    assert cli.main(["run", "--dense-finetune-epochs", "-1", "--out-dir", str(tmp_path)]) == 2
    assert "--dense-finetune-epochs: must be >= 0" in capsys.readouterr().err
    assert cli.main(["reproduce", "bmrs-posttrain", "--dense-finetune-epochs", "2", "--out-dir", str(tmp_path)]) == 2
    assert "apply to bmrs-table1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown dense_finetune_schedule"):
        schedule_factor("step", 0, 3)


def test_reproduce_gives_every_noisy_row_the_dense_finetune(tmp_path):
    cfgs = bmrs_table1_configs(tmp_path, [0], models=["mlp"], datasets=["mnist"], threshold=-0.919,
                               dense_finetune_epochs=5, dense_finetune_lr=1e-3)
    by = {(c.method, c.precision if c.method == "bmrs_u" else c.threshold): c for c in cfgs}
    assert by[("dense", None)].dense_finetune_epochs == 0 and by[("dense", None)].dense_finetune_lr is None
    noisy = [c for c in cfgs if c.method != "dense"]
    assert len(noisy) == 7 and all(c.dense_finetune_epochs == 5 and c.dense_finetune_lr == 1e-3 for c in noisy)
    # the pruning run of each is the one without the option (same run directory)
    assert all(pruning_config(c).dense_finetune_epochs == 0 and pruning_config(c).out_dir == c.out_dir for c in noisy)


def test_cli_run_reports_the_dense_finetune(tmp_path, capsys):
    args = ["run", "--model", "mlp", "--width", "12", "--extra-layers", "0", "--epochs", "1", "--finetune-epochs", "0",
            "--batch-size", "64", "--method", "snr", "--compression", "0.5", "--dense-finetune-epochs", "1",
            "--out-dir", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    summary = json.loads(next(tmp_path.rglob("dense-ft1/summary.json")).read_text())
    assert f"{100 * summary['test_acc']:.2f}" in out
    assert "dense fine-tune 1 epochs (cross-entropy only, no noise)" in out
    assert f"MACs {summary['size_speed']['macs']['ratio']:.2f}x fewer" in out


def test_cli_run_with_an_image_size_fine_tunes_on_the_same_images(tmp_path, capsys):
    """``--image-size`` reaches the pruning run and its dense fine-tune alike (the fine-tune once
    reloaded the data at the data set's own size and could not load the run's checkpoint)."""
    args = ["run", "--model", "mlp", "--width", "12", "--extra-layers", "0", "--epochs", "1", "--finetune-epochs", "0",
            "--batch-size", "64", "--method", "snr", "--compression", "0.5", "--dense-finetune-epochs", "1",
            "--image-size", "6", "--out-dir", str(tmp_path), "--quiet"]
    assert cli.main(args) == 0
    config = json.loads(next(tmp_path.rglob("seed0/config.json")).read_text())
    assert config["image_size"] == 6
    summary = json.loads(next(tmp_path.rglob("dense-ft1/summary.json")).read_text())
    assert summary["params_dense"] == 6 * 6 * 12 + 12 + 12 * 10 + 10  # the MLP on 6x6 images, not 8x8
    assert summary["params_kept"] < summary["params_dense"]
