"""Results: tables (Markdown/CSV), plots (PNG) and rank correlations between criteria.

* :func:`find_summaries` walks run directories for ``summary.json``.
* :func:`table1` / :func:`bf_table` aggregate them into the papers' Table 1 layouts
  (mean ± sample standard deviation over seeds, and n), written by :func:`table_markdown` and
  :func:`table_csv`.
* :func:`aggregate_sweeps` / :func:`sweep_markdown`: the post-training curves and BMRS stop
  points, mean over seeds.
* :func:`plot_sweep` (accuracy vs compression), :func:`structure_stats` +
  :func:`plot_structure_histograms` (E[theta] before/after pruning, dF_N, dF_U),
  :func:`plot_bf_history` (learning curves of a Bayes-factor run).
* :func:`spearman_matrix`, :func:`plot_spearman` and :func:`matrix_csv`: Spearman rank
  correlations between pruning criteria over all structures of a model.

matplotlib is used with the non-interactive Agg backend; every plot is a PNG file.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..noise import DEFAULT_KL_WEIGHTING

__all__ = [
    "METHOD_ROWS",
    "BF_COLUMNS",
    "method_label",
    "mean_std",
    "find_summaries",
    "Table",
    "table1",
    "bf_table",
    "table_markdown",
    "table_csv",
    "plot_sweep",
    "sweep_figure",
    "aggregate_sweeps",
    "sweep_markdown",
    "structure_stats",
    "plot_structure_histograms",
    "SPEARMAN_CRITERIA",
    "criterion_scores",
    "spearman_matrix",
    "matrix_markdown",
    "matrix_csv",
    "plot_spearman",
    "plot_bf_history",
]

#: Row order of the BMRS paper's Table 1 (other methods, e.g. Grad or other precisions, follow).
METHOD_ROWS: tuple[str, ...] = ("None", "None (no noise)", "L2", "E[θ]", "SNR", "BMRS_N", "BMRS_U-8", "BMRS_U-4")
#: Column order of the Bayes-factor paper's Table 1 (per model and data set).
BF_COLUMNS: tuple[str, ...] = ("unpruned", "random", "Bayes random", "magnitude", "Bayes magnitude")
BF_COLUMNS += tuple(f"{c} (output spared)" for c in BF_COLUMNS[1:])  # bf-run --spare-output

_LABELS = {"none": "None", "dense": "None (no noise)", "l2": "L2", "etheta": "E[θ]", "snr": "SNR", "bmrs_n": "BMRS_N", "grad": "Grad"}


def method_label(config: dict) -> str:
    """Row label of a continuous run's config: ``bmrs_u`` becomes ``BMRS_U-<precision>``; a rule,
    a KL weighting other than the default and a dense fine-tune are named after it."""
    method = config.get("method", "?")
    label = f"BMRS_U-{float(config.get('precision', 8)):g}" if method == "bmrs_u" else _LABELS.get(method, method)
    thr = config.get("threshold")
    if method in ("bmrs_n", "bmrs_u") and thr is not None and thr != 0:
        label += f" (dF ≥ {thr:.3g})"
    odds = config.get("prior_odds")
    if method in ("bmrs_n", "bmrs_u") and odds is not None and odds != 1:
        label += f" (prior odds {odds:.3g})"
    if config.get("kl_weighting", DEFAULT_KL_WEIGHTING) != DEFAULT_KL_WEIGHTING:
        label += f" ({config['kl_weighting']} KL)"
    if config.get("kl_scale", 1) != 1:
        label += f" (KL x {config['kl_scale']:g})"
    if config.get("dense_finetune_epochs"):  # experiments/finetune.py: shrunk, then cross-entropy only
        label += f" + dense FT {config['dense_finetune_epochs']}"
        extra = [f"lr {config['dense_finetune_lr']:g}"] if config.get("dense_finetune_lr") is not None else []
        extra += [config["dense_finetune_schedule"]] if config.get("dense_finetune_schedule", "cosine") != "cosine" else []
        label += f" ({', '.join(extra)})" if extra else ""
    return label


def mean_std(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, sample standard deviation (ddof=1; 0 for one value), n) of the finite values."""
    v = np.asarray([float(x) for x in values if x is not None and math.isfinite(float(x))], dtype=np.float64)
    n = int(v.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if n > 1 else 0.0, n


def find_summaries(paths: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """Every ``summary.json`` under ``paths`` (files or directories, searched recursively).

    Summaries of the training phase of a sweep (``<sweep>/train/summary.json``) are skipped: they
    are intermediate results, not rows of a table.  Raises ``FileNotFoundError`` for a path that
    does not exist and ``ValueError`` for an unreadable summary (naming the file).
    """
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist")
        if p.is_file():
            found.append(p)
        else:
            found.extend(sorted(p.rglob("summary.json")))
    out: list[tuple[Path, dict]] = []
    seen: set[Path] = set()
    for f in found:
        f = f.resolve()
        if f in seen:
            continue
        seen.add(f)
        if f.parent.name == "train" and (f.parent.parent / "sweep.json").exists():
            continue
        try:
            out.append((f, json.loads(f.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {f}: {e}") from e
    return out


def _is_bf(summary: dict) -> bool:
    return summary.get("kind") == "bayes_factor"


# ---------------------------------------------------------------------------------------------
# tables
@dataclass
class Cell:
    """Aggregated numbers of one table cell (values in %)."""

    values: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # name -> (mean, std, n)
    text: str = ""


@dataclass
class Table:
    title: str
    rows: list[str]
    columns: list[tuple[str, ...]]  # column keys, e.g. (model, dataset)
    column_names: list[str]
    cells: dict[tuple[str, tuple[str, ...]], Cell]
    csv_fields: list[str]


def _fmt(m: float, s: float, digits: int = 2) -> str:
    if not math.isfinite(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def table1(summaries: Sequence[dict]) -> Table:
    """The BMRS paper's Table 1 from continuous-run summaries.

    Rows: methods (:data:`METHOD_ROWS` first), columns: (model, dataset) pairs, cells:
    ``compression % / accuracy %`` as mean ± std over seeds, and n.  Compression is the
    parameter compression ``1 - params_kept / params_dense``; accuracy is the test accuracy.
    """
    groups: dict[tuple[str, tuple[str, str]], list[dict]] = {}
    for s in summaries:
        if _is_bf(s) or "config" not in s:
            continue
        cfg = s["config"]
        key = (method_label(cfg), (cfg.get("model", "?"), cfg.get("dataset", "?")))
        groups.setdefault(key, []).append(s)
    rows_present = {k[0] for k in groups}
    rows = [r for r in METHOD_ROWS if r in rows_present] + sorted(rows_present - set(METHOD_ROWS))
    columns = sorted({k[1] for k in groups})
    cells: dict = {}
    for key, runs in groups.items():
        comp = mean_std(100 * r["param_compression"] for r in runs)
        acc = mean_std(100 * r["test_acc"] for r in runs)
        sc = mean_std(100 * r.get("structure_compression", math.nan) for r in runs)
        cells[key] = Cell(
            values={"compression": comp, "accuracy": acc, "structure_compression": sc},
            text=f"{_fmt(*comp[:2])} / {_fmt(*acc[:2])} (n={acc[2]})",
        )
    return Table(
        title="Parameter compression % / test accuracy % (mean ± std over seeds)",
        rows=rows,
        columns=columns,
        column_names=[f"{m} / {d}" for m, d in columns],
        cells=cells,
        csv_fields=["compression", "accuracy", "structure_compression"],
    )


def bf_column(summary: dict) -> str:
    """Column of a Bayes-factor run: unpruned, random, Bayes random, magnitude, Bayes magnitude,
    the last four with " (output spared)" for runs that left the output layer unpruned."""
    mode = summary.get("mode", "none")
    if mode == "none":
        return "unpruned"
    col = f"Bayes {mode}" if summary.get("gated") else mode
    return f"{col} (output spared)" if (summary.get("config") or {}).get("spare_output") else col


def bf_table(summaries: Sequence[dict]) -> Table:
    """The Bayes-factor paper's Table 1 from ``bf-run`` summaries.

    Rows: sparsity r; columns: (model, dataset, variant) with the variants of :data:`BF_COLUMNS`;
    cells: test accuracy % as mean ± std over seeds (and n).  The unpruned baseline has no
    sparsity; its value is repeated in every row.
    """
    groups: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    unpruned: dict[tuple[str, str], list[dict]] = {}
    for s in summaries:
        if not _is_bf(s):
            continue
        md = (s.get("model", "?"), s.get("dataset", "?"))
        col = bf_column(s)
        if col == "unpruned":
            unpruned.setdefault(md, []).append(s)
        else:
            groups.setdefault((f"{float(s['sparsity']):g}", (*md, col)), []).append(s)
    rows = sorted({k[0] for k in groups}, key=float) or (["-"] if unpruned else [])
    pairs = sorted({k[1][:2] for k in groups} | set(unpruned))
    columns: list[tuple[str, ...]] = []
    for md in pairs:
        for c in BF_COLUMNS:
            if (c == "unpruned" and md in unpruned) or any(k[1] == (*md, c) for k in groups):
                columns.append((*md, c))
    cells: dict = {}

    def cell(runs):
        acc = mean_std(100 * r["test_acc"] for r in runs)
        sp = mean_std(100 * r.get("final_sparsity", 0.0) for r in runs)
        dead = mean_std(r.get("dead_structures", 0) for r in runs)
        return Cell(values={"accuracy": acc, "sparsity": sp, "dead_structures": dead}, text=f"{_fmt(*acc[:2])} (n={acc[2]})")

    for key, runs in groups.items():
        cells[key] = cell(runs)
    for md, runs in unpruned.items():
        c = cell(runs)
        for r in rows:
            cells[(r, (*md, "unpruned"))] = c
    return Table(
        title="Test accuracy % (mean ± std over seeds) by target sparsity r",
        rows=rows,
        columns=columns,
        column_names=[f"{m} / {d}: {c}" for m, d, c in columns],
        cells=cells,
        csv_fields=["accuracy", "sparsity", "dead_structures"],
    )


def table_markdown(table: Table, row_header: str = "method") -> str:
    """A Markdown table: one row per ``table.rows``, one column per ``table.columns``."""
    lines = [f"{table.title}", "", "| " + " | ".join([row_header, *table.column_names]) + " |"]
    lines.append("|" + "---|" * (len(table.columns) + 1))
    for r in table.rows:
        cells = [table.cells[(r, c)].text if (r, c) in table.cells else "–" for c in table.columns]
        lines.append("| " + " | ".join([r, *cells]) + " |")
    return "\n".join(lines) + "\n"


def table_csv(table: Table, row_header: str = "method") -> str:
    """Long-format CSV: one line per cell with ``<name>_mean``, ``<name>_std`` and n."""
    buf = io.StringIO()
    key_names = ["model", "dataset", "variant"][: len(table.columns[0])] if table.columns else ["model", "dataset"]
    header = [row_header, *key_names, "n"]
    for name in table.csv_fields:
        header += [f"{name}_mean", f"{name}_std"]
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in table.rows:
        for c in table.columns:
            cell = table.cells.get((r, c))
            if cell is None:
                continue
            first = cell.values[table.csv_fields[0]]
            line: list[Any] = [r, *c, first[2]]
            for name in table.csv_fields:
                m, s, _ = cell.values[name]
                line += [f"{m:.6g}", f"{s:.6g}"]
            w.writerow(line)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110, tight_bbox: bool = False) -> Path:
    """Lay out ``fig``, write it as PNG to ``path`` (creating its folder; atomically,
    rundir.write_bytes) and close it."""
    from .rundir import write_bytes

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight_bbox else None)
    finally:
        _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return path


def _integer_ticks(ax) -> None:
    """Ticks at whole numbers only (epochs)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def aggregate_sweeps(sweeps: Sequence[dict]) -> dict:
    """Mean over seeds of the sweep points and stop points, per criterion.

    Returns ``{"curves": {criterion: [(target, compression %, acc %, acc std %, n)]},
    "stops": {criterion: (compression %, acc %, n)}}``.
    """
    pts: dict[str, dict[float, list[dict]]] = {}
    stops: dict[str, list[dict]] = {}
    for sw in sweeps:
        for p in sw.get("points", []):
            pts.setdefault(p["criterion"], {}).setdefault(float(p["target"]), []).append(p)
        for c, st in sw.get("stops", {}).items():
            stops.setdefault(c, []).append(st)
    curves = {}
    for c, by_target in pts.items():
        rows = []
        for t in sorted(by_target):
            ps = by_target[t]
            comp = mean_std(100 * p["param_compression"] for p in ps)
            acc = mean_std(100 * p["test_acc"] for p in ps)
            rows.append((t, comp[0], acc[0], acc[1], acc[2]))
        curves[c] = rows
    stop_out = {}
    for c, sts in stops.items():
        comp = mean_std(100 * s["param_compression"] for s in sts)
        acc = mean_std(100 * s["test_acc"] for s in sts)
        stop_out[c] = (comp[0], acc[0], acc[2])
    return {"curves": curves, "stops": stop_out}


def plot_table1(table: Table, path: str | Path, paper: dict | None = None, title: str | None = None) -> Path:
    """Accuracy against parameter compression, one panel per (model, dataset) column of a
    :func:`table1` table: our rows as filled markers with mean ± std bars, and the ``paper``'s
    (``{(model, dataset): {row: (compression %, accuracy %)}}``) as hollow markers of the same
    colour, so that each method's distance to the paper reads off the picture."""
    plt = _plt()
    cols = table.columns
    ncol = min(3, len(cols))
    nrow = -(-len(cols) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.9 * nrow), squeeze=False)
    base = lambda row: row.split(" (")[0]  # noqa: E731  'BMRS_N (dF >= -0.919)' -> 'BMRS_N'
    names = sorted({base(r) for r in table.rows} | {r for c in (paper or {}).values() for r in c})
    color = {n: f"C{i % 10}" for i, n in enumerate(names)}
    markers = "osD^v<>pP*Xh"
    for ax, col in zip(axes.flat, cols):
        for i, row in enumerate(table.rows):
            cell = table.cells.get((row, col))
            if cell is None:
                continue
            (cm, cs, _), (am, as_, n) = cell.values["compression"], cell.values["accuracy"]
            ax.errorbar(cm, am, xerr=cs, yerr=as_, fmt=markers[i % len(markers)], color=color[base(row)],
                        ms=6, capsize=2, label=f"{row} (n={n})")
        for row, (cm, am) in (paper or {}).get(col, {}).items():
            ax.plot(cm, am, marker="o", ms=9, mfc="none", mew=1.5, ls="none", color=color.get(row, "k"),
                    label=f"paper {row}")
        ax.set_title(" / ".join(col))
        ax.set_xlabel("parameters removed (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(cols):]:
        ax.axis("off")
    legend = {}
    for ax in axes.flat:  # one legend for the figure: every label once
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label.split(" (n=")[0], handle)
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path, tight_bbox=True)


def load_sweeps(group: str | Path) -> list[dict]:
    """The ``sweep.json`` of every seed in one ``<model>-<dataset>-sweep`` folder, by seed folder
    name; an empty list when none has finished."""
    return [json.loads(p.read_text()) for p in sorted(Path(group).glob("seed*/sweep.json"))]


def sweep_title(sweeps: Sequence[dict]) -> str:
    """``"<model> / <dataset>, post-training, <n> seed(s)"`` for plots and headings."""
    cfg = sweeps[0]["config"]
    return f"{cfg['model']} / {cfg['dataset']}, post-training, {len(sweeps)} seed(s)"


def sweep_markdown(sweeps: Sequence[dict]) -> str:
    """The post-training curves as a Markdown table (one row per target compression, one column
    per criterion; cells ``parameters removed % / test accuracy % mean ± sd``), then one line per
    BMRS stop point; means over the ``sweeps`` (one ``sweep.json`` dict per seed)."""
    agg = aggregate_sweeps(sweeps)
    crits = list(agg["curves"])
    targets = sorted({r[0] for rows in agg["curves"].values() for r in rows})
    lines = ["Cells: parameters removed / test accuracy.", "", "| target | " + " | ".join(crits) + " |",
             "|---|" + "---|" * len(crits)]
    for t in targets:
        cells = []
        for c in crits:
            r = next((r for r in agg["curves"][c] if r[0] == t), None)
            cells.append("-" if r is None else f"{r[1]:.1f} % / {r[2]:.2f} ± {r[3]:.2f}")
        lines.append(f"| {100 * t:g} % | " + " | ".join(cells) + " |")
    lines.append("")
    for label, (comp, acc, n) in agg["stops"].items():
        lines.append(f"* stop point of {label} (n={n}): {comp:.2f} % of parameters removed, test accuracy {acc:.2f} %")
    return "\n".join(lines) + "\n"


_SWEEP_STYLES = (("o", "-"), ("s", "--"), ("^", "-."), ("D", ":"), ("v", (0, (5, 1))), ("P", (0, (3, 1, 1, 1))))


def _same_curve(a: Sequence[tuple], b: Sequence[tuple]) -> bool:
    """Whether two aggregated curves lie on top of each other: at every target the same
    accuracy to 0.05 points and the same compression to 1 point (a marker's width)."""
    return len(a) == len(b) and all(abs(p[1] - q[1]) < 1.0 and abs(p[2] - q[2]) < 0.05 for p, q in zip(a, b))


def plot_sweep(sweeps: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """Accuracy against parameter compression for every criterion, mean over the ``sweeps``
    (one ``sweep.json`` dict per seed); BMRS stop points are marked with stars (with their
    rule).  Each criterion has its own marker and line style; a curve that lies on an earlier
    one is drawn with hollow, larger markers and the legend says which it coincides with; so is
    a stop point that lies on an earlier one (:func:`sweep_figure`)."""
    fig, _ax = sweep_figure(sweeps, title)
    return _save(fig, path, dpi=120)


def _same_point(a: tuple, b: tuple) -> bool:
    """Two stop points closer than a marker: 1.5 points of compression and 0.3 of accuracy."""
    return abs(a[0] - b[0]) < 1.5 and abs(a[1] - b[1]) < 0.3


def sweep_figure(sweeps: Sequence[dict], title: str | None = None):
    """The figure of :func:`plot_sweep`, not yet saved: ``(fig, ax)``."""
    plt = _plt()
    agg = aggregate_sweeps(sweeps)
    fig, ax = plt.subplots(figsize=(6.8, 4.6))
    colors, drawn = {}, []
    for i, (c, rows) in enumerate(agg["curves"].items()):
        x = [r[1] for r in rows]
        y = [r[2] for r in rows]
        e = [r[3] for r in rows]
        marker, ls = _SWEEP_STYLES[i % len(_SWEEP_STYLES)]
        under = [d for d, drows in drawn if _same_curve(rows, drows)]
        label = c + (f" (lies on {', '.join(under)})" if under else "")
        hollow = dict(mfc="none", ms=4 + 3 * len(under), mew=1.4) if under else dict(ms=4)
        (line,) = ax.plot(x, y, marker=marker, ls=ls, lw=1.3, label=label, zorder=3 + i, **hollow)
        ax.fill_between(x, np.subtract(y, e), np.add(y, e), color=line.get_color(), alpha=0.12)
        colors[c] = line.get_color()
        drawn.append((c, rows))
    thresholds = {}
    for sw in sweeps:
        for c, st in sw.get("stops", {}).items():
            thresholds.setdefault(c, st.get("threshold"))
    stops_drawn = []
    for c, (comp, acc, _n) in agg["stops"].items():
        base = c.split(" ")[0]
        marker = "*" if base == c else "P"
        thr = thresholds.get(c)
        rule = f", dF ≥ {thr:.3g}" if thr is not None else ""
        under = [d for d, pt in stops_drawn if _same_point((comp, acc), pt)]
        size = (14 if marker == "*" else 11) + 7 * len(under)
        # a stop on an earlier one: a larger hollow ring around it, so both stay visible
        style = dict(mfc="none", mew=2.2, mec=colors.get(base, "k")) if under else dict(mec="k")
        ax.plot([comp], [acc], marker=marker, ms=size, color=colors.get(base, "k"), ls="none",
                label=f"{c} stop{rule}" + (f" (around the {', '.join(under)} stop)" if under else ""),
                zorder=20 + len(stops_drawn), **style)
        stops_drawn.append((c, (comp, acc)))
    ax.set_xlabel("parameter compression (%)")
    ax.set_ylabel("test accuracy (%)")
    n = len(sweeps)
    ax.set_title(title or f"accuracy vs compression (mean over {n} seed{'s' if n != 1 else ''})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig, ax


def structure_stats(model, precision: float = 8.0) -> dict[str, np.ndarray]:
    """Per structure over all noise layers: ``etheta`` (E[theta]), ``df_n`` (dF of BMRS_N),
    ``df_u`` (dF of BMRS_U-precision), ``kept`` (mask != 0) and ``layer`` (index)."""
    import torch

    from ..noise import noise_layers
    from ..reduction import delta_f_normal, delta_f_uniform

    out: dict[str, list] = {"etheta": [], "df_n": [], "df_u": [], "kept": [], "layer": []}
    with torch.no_grad():
        for i, n in enumerate(noise_layers(model)):
            out["etheta"].append(n.expected_theta().detach().double().cpu().numpy())
            out["df_n"].append(delta_f_normal(n.mu, n.sigma, n.a, n.b).detach().cpu().numpy())
            out["df_u"].append(delta_f_uniform(n.mu, n.sigma, precision, n.a, n.b).detach().cpu().numpy())
            out["kept"].append((n.mask != 0).cpu().numpy())
            out["layer"].append(np.full(n.num_structures, i))
    if not out["etheta"]:
        raise ValueError("model has no noise layers")
    return {k: np.concatenate(v) for k, v in out.items()}


def _hist_kept_pruned(ax, values, kept, title, xlabel, log=False, labels=("kept", "pruned")):
    """Histogram of ``values`` split by ``kept``; infinite values (and, with ``log``, values
    <= 0) are drawn in the outermost bin on their side and counted in the legend, so every
    structure is in the picture; only NaN is left out (and counted in the title)."""
    v = np.asarray(values, dtype=np.float64)
    nan = np.isnan(v)
    low = np.zeros_like(nan)
    if log:
        low = ~nan & (v <= 0)
        v = np.where(~nan & ~low, np.log10(np.where(~nan & ~low, v, 1.0)), v)
    finite = np.isfinite(v) & ~low
    data = v[finite]
    lo, hi = (float(data.min()), float(data.max())) if data.size else (-1.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    bins = np.histogram_bin_edges(data, bins=40, range=(lo, hi))
    edge = 0.5 * (bins[1] - bins[0])
    clipped = np.where(low | (v == -np.inf), lo + edge, np.where(v == np.inf, hi - edge, v))
    outside = ~nan & ~finite
    for sel, label, color in ((kept, labels[0], "tab:blue"), (~kept, labels[1], "tab:red")):
        d = clipped[~nan & sel]
        if d.size:
            extra = int((outside & sel).sum())
            note = f", {extra} beyond the axis drawn at its edge" if extra else ""
            ax.hist(d, bins=bins, alpha=0.6, label=f"{label} ({d.size}{note})", color=color)
    dropped = int(nan.sum())
    ax.set_title(title + (f" [{dropped} NaN not shown]" if dropped else ""), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("structures")
    if v.size:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no structures", transform=ax.transAxes, ha="center", va="center")


def _symlog(x: np.ndarray) -> np.ndarray:
    """sign(x) log10(1 + |x|): dF spans many orders of magnitude; 0 (the decision point) stays 0."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.log10(1.0 + np.abs(x))


def plot_structure_histograms(stats: dict[str, np.ndarray], path: str | Path, precision: float = 8.0, title: str = "", *,
                              threshold_n: float = 0.0, threshold_u: float = 0.0) -> Path:
    """Histograms of E[theta] before pruning (all structures, kept vs pruned by the run's masks),
    after pruning (the kept ones), and of dF_N and dF_U, each coloured by its own rule (removed
    when dF >= ``threshold_n`` / ``threshold_u``, docs/maths.md), whatever rule the run used;
    log10 scale for E[theta], a signed log scale for dF with the threshold marked."""
    plt = _plt()
    kept = stats["kept"].astype(bool)
    fig, axes = plt.subplots(2, 2, figsize=(10.5, 7.2))
    _hist_kept_pruned(axes[0, 0], stats["etheta"], kept, "E[θ] before pruning (all structures, by the run's masks)", "log10 E[θ]", log=True)
    _hist_kept_pruned(axes[0, 1], stats["etheta"][kept], np.ones(int(kept.sum()), bool),
                      f"E[θ] after pruning ({int(kept.sum())} kept; {int((~kept).sum())} pruned are gone)", "log10 E[θ]", log=True)
    for ax, key, name, thr in ((axes[1, 0], "df_n", "BMRS_N", threshold_n), (axes[1, 1], "df_u", f"BMRS_U-{precision:g}", threshold_u)):
        df = np.asarray(stats[key], dtype=np.float64)
        removed = df >= thr
        short = name.split("_")[1].split("-")[0]
        _hist_kept_pruned(ax, _symlog(df), ~removed, f"ΔF {name}: removed when ΔF ≥ {thr:.3g} (its own rule)",
                          f"sign(ΔF_{short}) log10(1 + |ΔF_{short}|)", labels=("kept by this rule", "removed by this rule"))
        d = _symlog(df)
        d = d[np.isfinite(d)]
        mark = float(_symlog(np.array([thr]))[0])
        span = max(float(d.max() - d.min()) if d.size else 0.0, 0.05)
        if d.size and d.min() - 2 * span <= mark <= d.max() + 2 * span:  # the threshold is near the data: mark it
            ax.axvline(mark, color="k", lw=0.8, ls="--", label=f"threshold {thr:.3g}")
        elif d.size:  # marking it would squeeze the histogram into one pixel column
            side, verdict = ("right", "nothing to remove") if mark > d.max() else ("left", "every structure is removed")
            ax.text(0.98, 0.95, f"threshold ΔF = {thr:.3g} lies far to the {side}:\n{verdict} by this rule",
                    transform=ax.transAxes, ha="right", va="top", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


#: criteria of the rank-correlation table: (label, criterion, precision)
SPEARMAN_CRITERIA: tuple[tuple[str, str, float], ...] = (
    ("SNR", "snr", 8.0),
    ("E[θ]", "etheta", 8.0),
    ("L2", "l2", 8.0),
    ("BMRS_N", "bmrs_n", 8.0),
    ("BMRS_U-8", "bmrs_u", 8.0),
    ("BMRS_U-4", "bmrs_u", 4.0),
)


def criterion_scores(model, criteria: Sequence[tuple[str, str, float]] = SPEARMAN_CRITERIA) -> dict[str, np.ndarray]:
    """Keep scores of every structure of ``model`` (all noise layers concatenated), per criterion."""
    from ..pruning import scores

    return {
        label: np.concatenate([s.detach().cpu().numpy() for s in scores(model, crit, **({"precision": p} if crit == "bmrs_u" else {}))])
        for label, crit, p in criteria
    }


def spearman_matrix(score_table: dict[str, np.ndarray]) -> tuple[list[str], np.ndarray]:
    """Spearman rank correlation between every pair of score vectors (``scipy.stats.spearmanr``).

    Ties (e.g. many saturated dF values) get average ranks; a constant vector gives NaN.
    """
    import warnings

    from scipy.stats import spearmanr

    labels = list(score_table)
    k = len(labels)
    m = np.eye(k)
    for i in range(k):
        for j in range(i + 1, k):
            a, b = score_table[labels[i]], score_table[labels[j]]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rho = spearmanr(a, b).statistic if np.ptp(a) > 0 and np.ptp(b) > 0 else math.nan
            m[i, j] = m[j, i] = float(rho)
    return labels, m


def matrix_markdown(labels: Sequence[str], m: np.ndarray) -> str:
    lines = ["| | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for i, r in enumerate(labels):
        lines.append("| " + r + " | " + " | ".join(f"{v:.3f}" for v in m[i]) + " |")
    return "\n".join(lines) + "\n"


def matrix_csv(labels: Sequence[str], m: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["criterion", *labels])
    for i, r in enumerate(labels):
        w.writerow([r, *(f"{v:.6f}" for v in m[i])])
    return buf.getvalue()


def plot_spearman(labels: Sequence[str], m: np.ndarray, path: str | Path, title: str = "Spearman rank correlation") -> Path:
    plt = _plt()
    k = len(labels)
    fig, ax = plt.subplots(figsize=(1.0 * k + 2, 1.0 * k + 1))
    im = ax.imshow(m, vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(k), labels, rotation=45, ha="right")
    ax.set_yticks(range(k), labels)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, "n/a" if not math.isfinite(m[i, j]) else f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Spearman rank correlation ρ")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_bf_history(history: dict, path: str | Path, title: str = "") -> Path:
    """Learning curves of a Bayes-factor run (as in the paper's figures): training and
    validation loss per epoch (left); log Bayes factor and global weight sparsity per epoch
    (right, two y axes)."""
    plt = _plt()
    ep = history["epoch"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    a1.plot(ep, history["train_loss"], marker="o", ms=3, label="training loss")
    a1.plot(ep, history["val_loss"], marker="o", ms=3, label="validation loss")
    a1.set_xlabel("epoch")
    _integer_ticks(a1)
    a1.set_ylabel("cross-entropy")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    lbf = np.asarray([math.nan if v is None else float(v) for v in history["log_bf"]], dtype=np.float64)
    finite = np.isfinite(lbf)
    if finite.any():
        a2.plot(np.asarray(ep)[finite], lbf[finite], marker="o", ms=3, color="tab:green", label="log BF")
    else:
        a2.text(0.5, 0.5, "no Bayes factor (ungated / unpruned)", transform=a2.transAxes, ha="center", fontsize=8)
    a2.set_xlabel("epoch")
    _integer_ticks(a2)
    a2.set_ylabel("log Bayes factor", color="tab:green")
    a2.grid(alpha=0.3)
    a3 = a2.twinx()
    a3.plot(ep, [100 * s for s in history["sparsity"]], marker="s", ms=3, color="tab:purple", label="sparsity")
    a3.set_ylabel("weight sparsity (%)", color="tab:purple")
    a3.set_ylim(-2, 102)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
