"""The knee of a post-training accuracy/compression curve, and how far the BMRS stops are from it
(docs/maths.md section 4, "Post-training pruning").

The BMRS paper claims that its criteria stop "at the knee" of the curve.  We define the knee
objectively: the largest parameter compression whose test accuracy is within ``tolerance``
points of the unpruned network (the curve's point at compression 0), linearly interpolated
between the last sweep point within tolerance and the next one::

    i*   = max { i : acc_i >= acc_0 - tolerance }
    knee = c_i*                                         if i* is the last point
         = c_i* + (c_i*+1 - c_i*) (acc_i* - t) / (acc_i* - acc_i*+1),   t = acc_0 - tolerance

The accuracy at the knee is the curve's (interpolated) value there.  A stop's distance to the knee
is ``stop - knee`` in compression points and in accuracy points (positive compression distance:
the stop prunes more than the knee).  Each seed's stop is measured against the same seed's curve
of the stop's own criterion, then averaged over seeds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from .results import mean_std

__all__ = ["Knee", "StopDistance", "knee", "stop_distances", "knee_markdown", "plot_knees", "STOP_CURVES"]

#: which curve each stop of a sweep is measured against (its own criterion's ranking)
STOP_CURVES = {"bmrs_n": "bmrs_n", "bmrs_n (reference)": "bmrs_n", "bmrs_u": "bmrs_u"}


@dataclass(frozen=True)
class Knee:
    compression: float  # % of parameters removed
    accuracy: float  # % test accuracy of the curve at the knee
    baseline: float  # % test accuracy at compression 0


@dataclass(frozen=True)
class StopDistance:
    stop: str  # the stop's label in sweep.json, e.g. "bmrs_n (reference)"
    curve: str  # the criterion whose curve defines the knee
    n: int  # seeds
    knee_compression: tuple[float, float]  # mean, sd (%)
    knee_accuracy: tuple[float, float]
    stop_compression: tuple[float, float]
    stop_accuracy: tuple[float, float]
    d_compression: tuple[float, float]  # stop - knee, mean, sd (points)
    d_accuracy: tuple[float, float]

    def to_dict(self) -> dict:
        return asdict(self)


def knee(compression: Sequence[float], accuracy: Sequence[float], tolerance: float = 1.0) -> Knee:
    """The knee of one curve (percentages), as defined in the module docstring.

    ``compression`` must start at 0 (the unpruned network) and increase."""
    c, a = [float(x) for x in compression], [float(x) for x in accuracy]
    if len(c) != len(a) or not c:
        raise ValueError(f"compression and accuracy need the same non-zero length, got {len(c)} and {len(a)}")
    if not all(math.isfinite(x) for x in c + a):
        raise ValueError("compression and accuracy must be finite")
    if any(c2 < c1 for c1, c2 in zip(c, c[1:])):
        raise ValueError(f"compression must be non-decreasing, got {c}")
    if not tolerance >= 0 or not math.isfinite(tolerance):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
    base = a[0]
    t = base - tolerance
    i = max(k for k in range(len(a)) if a[k] >= t)  # k = 0 qualifies
    if i == len(a) - 1:
        return Knee(c[i], a[i], base)
    frac = (a[i] - t) / (a[i] - a[i + 1])  # a[i+1] < t <= a[i]
    return Knee(c[i] + frac * (c[i + 1] - c[i]), a[i] + frac * (a[i + 1] - a[i]), base)


def _curve(sweep: dict, criterion: str) -> tuple[list[float], list[float]]:
    pts = sorted((p for p in sweep["points"] if p["criterion"] == criterion), key=lambda p: p["target"])
    if not pts:
        raise ValueError(f"sweep of seed {sweep['config'].get('seed')} has no curve for {criterion!r}")
    return [100 * p["param_compression"] for p in pts], [100 * p["test_acc"] for p in pts]


def stop_distances(sweeps: Sequence[dict], tolerance: float = 1.0) -> list[StopDistance]:
    """Distance of every BMRS stop to the knee of its own criterion's curve, mean ± sd over the
    ``sweeps`` (one ``sweep.json`` dict per seed)."""
    out = []
    labels = [s for s in STOP_CURVES if any(s in sw.get("stops", {}) for sw in sweeps)]
    for label in labels:
        rows = []
        for sw in sweeps:
            stop = sw.get("stops", {}).get(label)
            if stop is None:
                continue
            k = knee(*_curve(sw, STOP_CURVES[label]), tolerance=tolerance)
            sc, sa = 100 * stop["param_compression"], 100 * stop["test_acc"]
            rows.append((k.compression, k.accuracy, sc, sa, sc - k.compression, sa - k.accuracy))
        cols = list(zip(*rows))
        ms = [mean_std(col)[:2] for col in cols]
        out.append(StopDistance(label, STOP_CURVES[label], len(rows), *ms))
    return out


def knee_markdown(groups: dict[str, list[StopDistance]], tolerance: float = 1.0) -> str:
    """One table over sweep groups (``{title: stop_distances(...)}``)."""
    lines = [f"Knee: the largest compression within {tolerance:g} accuracy point of the unpruned network "
             "(interpolated); distance = stop - knee; mean ± sd over seeds.", "",
             "| sweep | stop | n | knee: removed % / acc % | stop: removed % / acc % | Δ removed (points) | Δ acc (points) |",
             "|---|---|---|---|---|---|---|"]
    for title, dists in groups.items():
        for d in dists:
            f = lambda m: f"{m[0]:.1f} ± {m[1]:.1f}"  # noqa: E731
            lines.append(f"| {title} | {d.stop} | {d.n} | {f(d.knee_compression)} / {f(d.knee_accuracy)} | "
                         f"{f(d.stop_compression)} / {f(d.stop_accuracy)} | {d.d_compression[0]:+.1f} ± {d.d_compression[1]:.1f} | "
                         f"{d.d_accuracy[0]:+.2f} ± {d.d_accuracy[1]:.2f} |")
    return "\n".join(lines) + "\n"


def plot_knees(sweeps: Sequence[dict], path, tolerance: float = 1.0, title: str | None = None):
    """Each BMRS criterion's mean curve with its knee (open circle on the curve, dotted line at
    the tolerance band) and its stops (filled markers), mean over seeds."""
    from .results import _plt, _save, aggregate_sweeps

    plt = _plt()
    agg = aggregate_sweeps(sweeps)
    dists = {d.stop: d for d in stop_distances(sweeps, tolerance)}
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    color = {}
    for i, crit in enumerate(sorted({d.curve for d in dists.values()})):
        rows = agg["curves"][crit]
        (line,) = ax.plot([r[1] for r in rows], [r[2] for r in rows], marker="o", ms=3, color=f"C{i}",
                          label=f"{crit} curve")
        color[crit] = line.get_color()
        k = next(d for d in dists.values() if d.curve == crit)
        ax.plot([k.knee_compression[0]], [k.knee_accuracy[0]], marker="o", ms=12, mfc="none", mew=2,
                color=color[crit], ls="none", label=f"{crit} knee ({k.knee_compression[0]:.1f} %)")
    base = agg["curves"][next(iter(color))][0][2]
    ax.axhline(base - tolerance, color="grey", ls=":", lw=1, label=f"unpruned - {tolerance:g} point")
    markers = {"bmrs_n": "*", "bmrs_n (reference)": "P", "bmrs_u": "X"}
    for label, d in dists.items():
        ax.plot([d.stop_compression[0]], [d.stop_accuracy[0]], marker=markers.get(label, "D"), ms=13, mec="k",
                color=color[d.curve], ls="none",
                label=f"{label} stop ({d.d_compression[0]:+.1f} points from knee)")
    ax.set_xlabel("parameters removed (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title or f"knee and BMRS stops (mean over {len(sweeps)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path, dpi=120)
