"""The knee of a post-training curve and the distance of the BMRS stops to it."""

import numpy as np
import pytest

from bayesprune.experiments.knee import knee, knee_markdown, plot_knees, stop_distances


def test_knee_interpolates_the_crossing_of_the_tolerance_band():
    # baseline 98; band 97; the curve crosses 97 between 80 % (97.5) and 90 % (95.5): a quarter of the way
    k = knee([0, 50, 80, 90, 99], [98, 98.2, 97.5, 95.5, 10], tolerance=1.0)
    assert k.compression == pytest.approx(80 + 10 * 0.5 / 2.0)
    assert k.accuracy == pytest.approx(97.0)
    assert k.baseline == 98


def test_knee_is_the_largest_compression_within_tolerance_after_a_dip():
    c, a = [0, 10, 20, 30, 40], [90, 88.5, 89.6, 89.2, 80]
    k = knee(c, a, tolerance=1.0)
    # independent: the last point within the band is 30 % (89.2); interpolate 89.2 -> 80 down to 89
    assert k.compression == pytest.approx(np.interp(89.0, [80, 89.2], [40, 30]))


def test_knee_without_crossing_is_the_last_point_and_zero_tolerance_works():
    assert knee([0, 50, 90], [95, 95.5, 94.6]).compression == 90
    assert knee([0, 50], [95, 94]).compression == pytest.approx(50.0)  # 94 >= 95 - 1 (inclusive)
    assert knee([0, 50], [95, 94], tolerance=0).compression == pytest.approx(0.0)


@pytest.mark.parametrize("c, a, tol, match", [
    ([0, 50], [95], 1.0, "same"), ([0, 50], [95, float("nan")], 1.0, "finite"),
    ([0, 50, 40], [95, 94, 93], 1.0, "non-decreasing"), ([0, 50], [95, 94], -1, "tolerance"),
])
def test_knee_refuses_bad_curves(c, a, tol, match):
    with pytest.raises(ValueError, match=match):
        knee(c, a, tolerance=tol)


def _sweep(seed, acc_curve, stop):
    pts = [{"criterion": "bmrs_n", "target": t / 100, "param_compression": t / 100, "test_acc": acc / 100}
           for t, acc in acc_curve]
    return {"config": {"seed": seed}, "points": pts,
            "stops": {"bmrs_n (reference)": {"param_compression": stop[0] / 100, "test_acc": stop[1] / 100}}}


def test_stop_distances_per_seed_then_mean(tmp_path):
    sweeps = [_sweep(0, [(0, 98), (90, 97.5), (95, 96.5)], (96, 96.0)),   # knee 92.5 %
              _sweep(1, [(0, 98), (90, 96.0), (95, 90.0)], (80, 97.0))]   # knee 0 + 90 * 1/2 = 45 %
    (d,) = stop_distances(sweeps)
    assert d.stop == "bmrs_n (reference)" and d.curve == "bmrs_n" and d.n == 2
    knees = [92.5, 45.0]
    assert d.knee_compression[0] == pytest.approx(np.mean(knees))
    assert d.d_compression[0] == pytest.approx(np.mean([96 - 92.5, 80 - 45.0]))
    assert d.d_compression[1] == pytest.approx(np.std([96 - 92.5, 80 - 45.0], ddof=1))
    assert d.d_accuracy[0] == pytest.approx(np.mean([96.0 - 97.0, 97.0 - 97.0]))
    md = knee_markdown({"toy": [d]})
    assert "| toy | bmrs_n (reference) | 2 |" in md
    assert plot_knees(sweeps, tmp_path / "k.png").stat().st_size > 1000
