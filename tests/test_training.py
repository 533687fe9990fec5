"""Protocols: durable runs (exact resume), NaN guard, BMRS_N on digits against None."""

import json

import pytest
import torch

import bayesprune.experiments.training as tr
from bayesprune.reduction import REFERENCE_THRESHOLD


def _cfg(tmp_path, name, **kw):
    base = dict(
        dataset="digits", model="mlp", width=32, extra_layers=1, epochs=3, finetune_epochs=1,
        batch_size=64, lr=3e-3, noise_lr=3e-2, method="bmrs_n", out_dir=str(tmp_path / name), device="cpu",
    )
    base.update(kw)
    return tr.resolve_config(**base)


def _metrics(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        r.pop("epoch_time")
    return rows


def test_resume_after_interruption_gives_identical_numbers(tmp_path, monkeypatch):
    full = tr.run_continuous(_cfg(tmp_path, "full"), progress=False)

    original = tr._train_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # killed during the third epoch
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tr, "_train_epoch", interrupted)
    cfg = _cfg(tmp_path, "resumed")
    with pytest.raises(KeyboardInterrupt):
        tr.run_continuous(cfg, progress=False)
    state = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2
    assert len(_metrics(tmp_path / "resumed")) == 2
    monkeypatch.setattr(tr, "_train_epoch", original)
    resumed = tr.run_continuous(cfg, progress=False)

    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "full")
    for key in ("test_acc", "test_loss", "param_compression", "structure_compression", "best_epoch"):
        assert resumed[key] == full[key], key
    # a finished run is not run again
    assert tr.run_continuous(cfg, progress=False)["test_acc"] == full["test_acc"]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "nan", epochs=3, finetune_epochs=0)
    original = tr._train_epoch
    calls = {"n": 0}

    def poisoned(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(tr, "_train_epoch", poisoned)
    with pytest.raises(tr.TrainingDiverged, match=r"checkpoint\.pt \(after epoch 1\); the same command resumes"):
        tr.run_continuous(cfg, progress=False)
    state = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="valid: digits"):
        tr.resolve_config(dataset="imagenet")
    with pytest.raises(ValueError, match="valid: mlp"):
        tr.resolve_config(model="vgg")
    with pytest.raises(ValueError, match="valid: none, bmrs_n"):
        tr.resolve_config(method="magic")
    with pytest.raises(ValueError, match="lr must be"):
        tr.resolve_config(lr=-1.0)
    with pytest.raises(ValueError, match="needs --compression"):
        tr.resolve_config(method="l2")
    (tmp_path / "x").mkdir()
    tr.RunDir(tmp_path / "x").write_config(_cfg(tmp_path, "x"))
    # a config.json without a checkpoint holds no training (a failed start): replaced, not refused
    tr.RunDir(tmp_path / "x").write_config(_cfg(tmp_path, "x", seed=5))
    assert json.loads((tmp_path / "x" / "config.json").read_text())["seed"] == 5
    tr.save_checkpoint({"epoch": 1}, tmp_path / "x" / "checkpoint.pt")
    with pytest.raises(ValueError, match="another configuration"):
        tr.RunDir(tmp_path / "x").write_config(_cfg(tmp_path, "x", seed=6))


def test_finished_run_with_another_configuration_is_not_reused(tmp_path):
    """A finished run directory is skipped only for the same configuration: asking it for another
    threshold (or any other setting) is an error naming the difference, not a silent re-use."""
    cfg = _cfg(tmp_path, "r", epochs=1, finetune_epochs=0)
    first = tr.run_continuous(cfg, progress=False)
    again = tr.run_continuous(cfg, progress=False)  # same configuration: skipped, summary re-read
    assert (again["test_acc"], again["wall_time_s"]) == (first["test_acc"], first["wall_time_s"])
    # another data directory or device is the same experiment
    moved = tr.run_continuous(_cfg(tmp_path, "r", epochs=1, finetune_epochs=0, data_dir=str(tmp_path / "elsewhere")), progress=False)
    assert moved["test_acc"] == first["test_acc"]
    assert cfg.threshold == REFERENCE_THRESHOLD  # the default rule, written out
    with pytest.raises(ValueError, match="another configuration.*threshold"):
        tr.run_continuous(_cfg(tmp_path, "r", epochs=1, finetune_epochs=0, prior_odds=1.0), progress=False)


def test_dense_method_trains_the_network_without_noise(tmp_path):
    """method "dense": the plain network (no noise layers, no KL), nothing pruned; its table row
    is "None (no noise)"; --shrink and plot refuse it with a clear message."""
    from bayesprune.experiments.cli import load_run_model, main
    from bayesprune.noise import noise_layers
    from bayesprune.experiments.results import method_label

    cfg = _cfg(tmp_path, "dense", method="dense", epochs=2, finetune_epochs=0)
    s = tr.run_continuous(cfg, progress=False)
    rows = _metrics(tmp_path / "dense")
    assert len(rows) == 2 and all(r["kl"] == 0.0 and r["train_loss"] == r["train_ce"] for r in rows)
    assert s["param_compression"] == 0.0 and s["params_kept"] == s["params_dense"] == 64 * 32 + 32 + 33 * 32 + 33 * 10
    assert s["test_acc"] > 0.5 and s["size_speed"] is None
    state = torch.load(tmp_path / "dense" / "checkpoint.pt", weights_only=True)
    assert not any("bayes_noise" in k for k in state["model"])
    model, _, _ = load_run_model(tmp_path / "dense", None)
    assert noise_layers(model) == []
    assert method_label(s["config"]) == "None (no noise)"
    with pytest.raises(ValueError, match="--shrink does not apply"):
        _cfg(tmp_path, "d2", method="dense", shrink=True)
    assert main(["plot", str(tmp_path / "dense")]) != 0


@pytest.mark.slow
def test_bmrs_n_prunes_on_digits_within_margin_of_none(tmp_path):
    """The reference threshold (exact dF_N + 0.919 >= 0) removes structures at None's accuracy.

    Margin: 5 accuracy points on the 359-image digits test set (a few seeds' spread there)."""
    kw = dict(epochs=10, finetune_epochs=2, batch_size=16, noise_lr=5e-2, sharing="element")
    none = tr.run_continuous(_cfg(tmp_path, "none", method="none", **kw), progress=False)
    bmrs = tr.run_continuous(_cfg(tmp_path, "bmrs", threshold=REFERENCE_THRESHOLD, **kw), progress=False)
    assert bmrs["structure_compression"] > 0.2
    assert bmrs["param_compression"] > 0.2
    assert bmrs["test_acc"] >= none["test_acc"] - 0.05
    assert none["param_compression"] == 0.0
    # the exact criterion's summary says what the reference offset would prune
    exact = tr.run_continuous(_cfg(tmp_path, "exact", prior_odds=1.0, **kw), progress=False)
    assert "reference_offset" in exact
    assert exact["reference_offset"]["param_compression"] >= exact["param_compression"]


def test_shrink_as_you_go_resumes_exactly(tmp_path, monkeypatch):
    """--shrink removes masked structures between epochs; an interrupted run rebuilds the
    shrunk architecture from the checkpoint's kept indices and ends with identical numbers."""
    kw = dict(epochs=5, finetune_epochs=1, batch_size=16, noise_lr=5e-2, threshold=REFERENCE_THRESHOLD, shrink=True)
    full = tr.run_continuous(_cfg(tmp_path, "full", **kw), progress=False)
    rows = _metrics(tmp_path / "full")
    assert rows[-1]["params"] < rows[0]["params"]  # physically smaller during training
    assert full["params_kept"] == rows[-1]["params"]

    original = tr._train_epoch
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(tr, "_train_epoch", interrupted)
    cfg = _cfg(tmp_path, "resumed", **kw)
    with pytest.raises(KeyboardInterrupt):
        tr.run_continuous(cfg, progress=False)
    monkeypatch.setattr(tr, "_train_epoch", original)
    resumed = tr.run_continuous(cfg, progress=False)
    assert _metrics(tmp_path / "resumed") == rows
    assert resumed["test_acc"] == full["test_acc"]


def test_kl_scale_multiplies_the_kl_term_of_the_loss():
    """kl_scale = beta: the loss is CE + beta x kl(model, weighting); from the same state, one
    step's KL is beta times the unscaled one and the CE is the same; beta goes into the run's
    directory name and label; bad values are named."""
    from bayesprune.experiments.data import ImageTensorDataset, load_dataset, make_loader
    from bayesprune.experiments.results import method_label

    splits = load_dataset("digits", seed=0)
    small = ImageTensorDataset(splits.train.images[:16], splits.train.labels[:16])
    means = {}
    for beta in (1.0, 30.0):
        cfg = tr.resolve_config(model="mlp", seed=0, device="cpu", kl_weighting="elbo", kl_scale=beta)
        tr._seed_all(0)
        model, _ = tr._build(cfg, splits, torch.device("cpu"))
        means[beta] = tr._train_epoch(model, tr._optimizer(model, cfg), make_loader(small, 16, True, seed=0), cfg,
                                      splits.num_train, torch.device("cpu"), "e")
    (loss1, ce1, kl1), (loss30, ce30, kl30) = means[1.0], means[30.0]
    assert kl1 > 0 and ce30 == pytest.approx(ce1, rel=1e-6)
    assert kl30 == pytest.approx(30 * kl1, rel=1e-6) and loss30 == pytest.approx(ce1 + 30 * kl1, rel=1e-6)
    assert tr.run_dir_name("mlp", "mnist", "bmrs_n", kl_weighting="elbo", kl_scale=30.0) == "mlp-mnist-bmrs_n-klelbo-klx30"
    assert tr.run_dir_name("mlp", "mnist", "bmrs_n", kl_scale=1.0) == "mlp-mnist-bmrs_n"
    assert "(KL x 30)" in method_label({"method": "bmrs_n", "kl_weighting": "elbo", "kl_scale": 30.0})
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="kl_scale must be a positive number"):
            tr.resolve_config(model="mlp", kl_scale=bad)
    with pytest.raises(ValueError, match="kl_scale does not apply"):
        tr.resolve_config(model="mlp", method="dense", kl_scale=2.0)
