"""Aggregation maths of bayesprune.experiments.results and Spearman correlations on a fixed model."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from bayesprune import add_noise, noise_layers
from bayesprune.experiments import results


def _summary(method, acc, comp, model="lenet5", dataset="mnist", precision=8.0):
    return {
        "config": {"method": method, "model": model, "dataset": dataset, "precision": precision},
        "test_acc": acc,
        "param_compression": comp,
        "structure_compression": comp / 2,
    }


def test_mean_std():
    m, s, n = results.mean_std([1.0, 2.0, 3.0, 4.0])
    assert (m, n) == (2.5, 4)
    assert s == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert results.mean_std([5.0]) == (5.0, 0.0, 1)
    m, s, n = results.mean_std([])
    assert math.isnan(m) and n == 0
    assert results.mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)), 2)


def test_method_labels():
    assert results.method_label({"method": "bmrs_u", "precision": 4.0}) == "BMRS_U-4"
    assert results.method_label({"method": "bmrs_u", "precision": 8}) == "BMRS_U-8"
    assert results.method_label({"method": "etheta"}) == "E[θ]"
    assert results.method_label({"method": "none"}) == "None"
    # runs that differ in their KL weighting get rows of their own
    assert results.method_label({"method": "bmrs_n", "kl_weighting": "mean"}) == "BMRS_N"
    assert results.method_label({"method": "bmrs_n", "kl_weighting": "elbo"}) == "BMRS_N (elbo KL)"


def test_table1_aggregation_and_layout():
    runs = [
        _summary("bmrs_n", 0.98, 0.60),
        _summary("bmrs_n", 0.96, 0.70),
        _summary("bmrs_n", 0.97, 0.65),
        _summary("none", 0.99, 0.0),
        _summary("bmrs_u", 0.95, 0.8, precision=4),
        _summary("bmrs_u", 0.97, 0.7, precision=8),
        _summary("l2", 0.5, 0.9, model="mlp", dataset="cifar10"),
    ]
    t = results.table1(runs)
    assert t.rows == ["None", "L2", "BMRS_N", "BMRS_U-8", "BMRS_U-4"]
    assert t.columns == [("lenet5", "mnist"), ("mlp", "cifar10")]
    cell = t.cells[("BMRS_N", ("lenet5", "mnist"))]
    acc = cell.values["accuracy"]
    assert acc[0] == pytest.approx(97.0) and acc[1] == pytest.approx(1.0) and acc[2] == 3
    comp = cell.values["compression"]
    assert comp[0] == pytest.approx(65.0) and comp[1] == pytest.approx(5.0)
    assert cell.text == "65.00 ± 5.00 / 97.00 ± 1.00 (n=3)"
    md = results.table_markdown(t)
    lines = [line for line in md.splitlines() if line.startswith("|")]
    assert lines[0] == "| method | lenet5 / mnist | mlp / cifar10 |"
    assert lines[4] == "| BMRS_N | 65.00 ± 5.00 / 97.00 ± 1.00 (n=3) | – |"
    rows = list(csv.DictReader(io.StringIO(results.table_csv(t))))
    assert len(rows) == 5
    r = next(r for r in rows if r["method"] == "BMRS_N")
    assert float(r["accuracy_mean"]) == pytest.approx(97.0)
    assert float(r["compression_std"]) == pytest.approx(5.0)
    assert float(r["structure_compression_mean"]) == pytest.approx(32.5)


def test_bf_table():
    def bf(mode, gated, r, acc):
        return {"kind": "bayes_factor", "model": "fcn", "dataset": "mnist", "mode": mode, "gated": gated,
                "sparsity": r, "test_acc": acc, "final_sparsity": r, "dead_structures": 1}

    runs = [bf("none", False, 0.0, 0.98), bf("none", False, 0.0, 0.96), bf("random", True, 0.5, 0.9),
            bf("random", False, 0.5, 0.8), bf("magnitude", True, 0.25, 0.95), bf("magnitude", False, 0.25, 0.94)]
    t = results.bf_table(runs)
    assert t.rows == ["0.25", "0.5"]
    assert [c[2] for c in t.columns] == list(results.BF_COLUMNS[:5])  # no spared-output runs: no such columns
    assert t.cells[("0.5", ("fcn", "mnist", "unpruned"))].values["accuracy"][0] == pytest.approx(97.0)
    assert t.cells[("0.25", ("fcn", "mnist", "unpruned"))].values["accuracy"][2] == 2
    assert t.cells[("0.5", ("fcn", "mnist", "Bayes random"))].text == "90.00 ± 0.00 (n=1)"
    assert ("0.25", ("fcn", "mnist", "random")) not in t.cells
    md = results.table_markdown(t, "sparsity r")
    assert "| 0.25 | 97.00 ± 1.41 (n=2) | – | – | 94.00 ± 0.00 (n=1) | 95.00 ± 0.00 (n=1) |" in md


def test_find_summaries_skips_sweep_training(tmp_path):
    (tmp_path / "a" / "seed0").mkdir(parents=True)
    (tmp_path / "a" / "seed0" / "summary.json").write_text(json.dumps(_summary("none", 0.9, 0.0)))
    sw = tmp_path / "s" / "seed0"
    (sw / "train").mkdir(parents=True)
    (sw / "train" / "summary.json").write_text(json.dumps(_summary("none", 0.9, 0.0)))
    (sw / "sweep.json").write_text("{}")
    found = results.find_summaries([tmp_path])
    assert [p.parent.name for p, _ in found] == ["seed0"]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "summary.json").write_text("{")
    with pytest.raises(ValueError, match="summary.json"):
        results.find_summaries([tmp_path])


def _fixed_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 6), nn.ReLU(), nn.Linear(6, 3))
    add_noise(model, torch.zeros(2, 8))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in noise_layers(model):
            n.mu.copy_(torch.randn(n.num_structures, generator=g))
            n.log_sigma.copy_(torch.randn(n.num_structures, generator=g) * 0.5 - 1)
    return model


def test_spearman_fixed_model(tmp_path):
    from scipy.stats import spearmanr

    model = _fixed_model()
    table = results.criterion_scores(model)
    assert list(table) == ["SNR", "E[θ]", "L2", "BMRS_N", "BMRS_U-8", "BMRS_U-4"]
    n = sum(x.num_structures for x in noise_layers(model))
    assert all(v.shape == (n,) for v in table.values())
    labels, m = results.spearman_matrix(table)
    assert m.shape == (6, 6)
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T, equal_nan=True)
    i, j = labels.index("E[θ]"), labels.index("L2")
    assert m[i, j] == pytest.approx(spearmanr(table["E[θ]"], table["L2"]).statistic)
    # a monotone transform keeps the rank correlation at exactly 1
    _, m2 = results.spearman_matrix({"a": table["E[θ]"], "b": np.exp(3 * table["E[θ]"])})
    assert m2[0, 1] == pytest.approx(1.0)
    # CSV and heatmap
    rows = list(csv.reader(io.StringIO(results.matrix_csv(labels, m))))
    assert rows[0][1:] == labels and float(rows[i + 1][j + 1]) == pytest.approx(m[i, j], abs=1e-6)
    assert results.plot_spearman(labels, m, tmp_path / "s.png").stat().st_size > 0


def test_structure_stats_and_histograms(tmp_path):
    model = _fixed_model()
    layers = noise_layers(model)
    layers[0].mask[:3] = 0
    st = results.structure_stats(model)
    n = sum(x.num_structures for x in layers)
    assert all(v.shape == (n,) for v in st.values())
    assert int((~st["kept"].astype(bool)).sum()) == 3
    assert np.allclose(st["etheta"][:12], layers[0].expected_theta().detach().double().numpy())
    assert results.plot_structure_histograms(st, tmp_path / "h.png").stat().st_size > 0


def test_sweep_aggregation_and_plot(tmp_path):
    def sw(acc):
        return {"points": [{"criterion": "l2", "target": 0.0, "param_compression": 0.0, "test_acc": acc},
                           {"criterion": "l2", "target": 0.5, "param_compression": 0.5, "test_acc": acc - 0.1}],
                "stops": {"bmrs_n": {"param_compression": 0.3, "test_acc": acc}}}

    agg = results.aggregate_sweeps([sw(0.9), sw(0.8)])
    t, comp, acc, sd, n = agg["curves"]["l2"][1]
    assert (t, n) == (0.5, 2) and comp == pytest.approx(50) and acc == pytest.approx(75) and sd == pytest.approx(math.sqrt(50))
    assert agg["stops"]["bmrs_n"][:2] == (pytest.approx(30), pytest.approx(85))
    assert results.plot_sweep([sw(0.9), sw(0.8)], tmp_path / "a.png").stat().st_size > 0


def test_plot_bf_history(tmp_path):
    h = {"epoch": [1, 2, 3], "train_loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.7, 0.6],
         "log_bf": [float("nan"), -3.0, 0.0], "sparsity": [0.5, 0.5, 0.5]}
    assert results.plot_bf_history(h, tmp_path / "c.png").stat().st_size > 0


def test_plot_table1_writes_one_png_with_our_and_the_papers_points(tmp_path, monkeypatch):
    runs = [_summary("bmrs_n", 0.98, 0.60), _summary("bmrs_n", 0.96, 0.70), _summary("none", 0.99, 0.0),
            _summary("l2", 0.5, 0.9, model="mlp", dataset="cifar10")]
    t = results.table1(runs)
    drawn = []
    import matplotlib.axes

    real_errorbar, real_plot = matplotlib.axes.Axes.errorbar, matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar",
                        lambda self, x, y, **kw: drawn.append(("ours", kw["label"], x, y)) or real_errorbar(self, x, y, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, x, y, **kw: drawn.append(("paper", kw["label"], x, y)) or real_plot(self, x, y, **kw))
    paper = {("lenet5", "mnist"): {"BMRS_N": (86.9, 95.59), "Other": (10.0, 50.0)}}
    path = results.plot_table1(t, tmp_path / "t1.png", paper=paper, title="x")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ("ours", "BMRS_N (n=2)", pytest.approx(65.0), pytest.approx(97.0)) in drawn
    assert ("ours", "L2 (n=1)", pytest.approx(90.0), pytest.approx(50.0)) in drawn
    assert ("paper", "paper BMRS_N", 86.9, 95.59) in drawn and ("paper", "paper Other", 10.0, 50.0) in drawn
    assert len([d for d in drawn if d[0] == "ours"]) == 3


def _pixels_near(fig, ax, point, half=9):
    """RGB pixels of the rendered ``fig`` in a (2*half)^2 window around data ``point``."""
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    x, y = ax.transData.transform(point)
    row = img.shape[0] - int(round(y))  # display y grows upwards, image rows downwards
    col = int(round(x))
    return img[row - half: row + half, col - half: col + half]


def test_sweep_plot_shows_coinciding_stops(tmp_path):
    """Every stop point stays visible where two coincide (the committed digits sweep: BMRS_N with
    the paper's prior odds and BMRS_U stop 0.4 points apart at the same accuracy), and the legend
    says which stop the ring is around. Pixels of the rendered figure near the stops, legend
    removed: a stop is visible when adding it to the other changes the picture there."""
    import json
    from pathlib import Path

    sweep = json.loads((Path(__file__).parents[1] / "results/digits/mlp-digits-sweep/seed0/sweep.json").read_text())
    stops = sweep["stops"]
    a, b = stops["bmrs_n (reference)"], stops["bmrs_u"]
    assert abs(a["param_compression"] - b["param_compression"]) < 0.015 and a["test_acc"] == b["test_acc"]

    def picture(keep):
        sw = dict(sweep, stops={k: v for k, v in stops.items() if k in keep})
        fig, ax = results.sweep_figure([sw])
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        ax.get_legend().remove()
        px = _pixels_near(fig, ax, (100 * b["param_compression"], 100 * b["test_acc"]))
        results._plt().close(fig)
        return px, labels

    both, labels = picture({"bmrs_n (reference)", "bmrs_u"})
    upper, _ = picture({"bmrs_u"})
    lower, _ = picture({"bmrs_n (reference)"})
    neither, _ = picture(set())

    def changed(x, y):
        return int((np.abs(x - y).sum(axis=-1) > 60).sum())

    # at least half of each stop's own footprint still shows when the other is drawn as well
    # (with both drawn solid, the star covered all but 41 % of the cross beneath it)
    assert changed(both, upper) >= 0.5 * changed(lower, neither) > 0
    assert changed(both, lower) >= 0.5 * changed(upper, neither) > 0
    assert any("around the bmrs_n (reference) stop" in t for t in labels)
    assert results.plot_sweep([sweep], tmp_path / "s.png").stat().st_size > 0
