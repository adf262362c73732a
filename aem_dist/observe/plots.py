"""The sweep report's figures, as pure functions of result rows (no storage access here).

* :func:`lambda_sensitivity` — test AUC and F1, mean ± std over seeds, against λ on a log axis
  (the paper's Fig. 5). λ = 0 has no place on a log axis, so it is drawn as a horizontal reference:
  a dashed line at its mean with a shaded ± std band, labelled "λ = 0 (ABMIL)".
* :func:`entropy_vs_auc` — mean test attention entropy against test AUC, one point per trial, with
  Pearson's r (Fig. 3).
* :func:`training_curves` — total train loss, its CE part, val AUC and test AUC per epoch, one line per
  trial, a row of panels per fold (Fig. 8).
* :func:`concentration` — cumulative attention against the fraction of top-ranked instances,
  λ = 0 against the chosen λ on the test set (Fig. 9).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullFormatter

from .figures import new_figure

LAM = "loss.lam"
SEED = "train.seed"
LINESTYLES = ("-", "--", ":", "-.")


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(float(v)) else math.nan


def fmt_lam(lam: Any) -> str:
    v = _num(lam)
    return "?" if math.isnan(v) else f"{v:g}"


def group_label(row: Mapping[str, Any], keys: Sequence[str]) -> str:
    """'model.name=mha' for the swept keys other than λ and the seed ('' when there are none)."""
    return ", ".join(f"{k}={row.get(k)}" for k in keys)


def unit_ylim(ax: Any, pad: float = 0.03) -> None:
    """Y limits of a 0-1 metric (AUC, F1): the data's range (error bars included) plus a little padding,
    never beyond [0, 1] — no tick at 1.02 for a metric that cannot exceed 1."""
    lo, hi = ax.dataLim.intervaly
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        lo, hi = 0.0, 1.0
    lo, hi = max(0.0, min(lo, 1.0) - pad), min(1.0, max(hi, 0.0) + pad)
    ax.set_ylim(lo, hi if hi > lo else min(1.0, lo + 0.05))


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def lambda_sensitivity(summary: Sequence[Mapping[str, Any]], trials: Sequence[Mapping[str, Any]], other_keys: Sequence[str], title: str = "") -> Figure:
    """Two panels (test AUC, test F1): mean ± std over seeds vs λ (log x), seeds as faint dots,
    λ = 0 as a dashed line with a ± std band, the λ chosen by validation as a star."""
    fig = new_figure(11, 5.0)
    axes = fig.subplots(1, 2)
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in summary:
        groups.setdefault(group_label(row, other_keys), []).append(row)
    colours = _colours(len(groups))
    positive = sorted({_num(r.get(LAM)) for r in summary if _num(r.get(LAM)) > 0})
    for ax, metric, name in ((axes[0], "test_auc", "test AUC"), (axes[1], "test_f1", "test F1")):
        for colour, (glabel, rows) in zip(colours, groups.items()):
            suffix = f" ({glabel})" if glabel else ""
            pos = sorted((r for r in rows if _num(r.get(LAM)) > 0), key=lambda r: _num(r.get(LAM)))
            if pos:
                x = [_num(r[LAM]) for r in pos]
                y = [_num(r.get(f"{metric}_mean")) for r in pos]
                e = [0.0 if math.isnan(_num(r.get(f"{metric}_std"))) else _num(r.get(f"{metric}_std")) for r in pos]
                ax.errorbar(x, y, yerr=e, color=colour, marker="o", capsize=4, lw=1.8, label=f"AEM, mean ± std over seeds{suffix}")
                for r in pos:
                    if r.get("chosen"):
                        ax.plot([_num(r[LAM])], [_num(r.get(f"{metric}_mean"))], marker="*", ms=16, color=colour, mec="black", ls="none",
                            label=f"chosen by validation{suffix}")
            members = [t for t in trials if group_label(t, other_keys) == glabel and _num(t.get(LAM)) > 0 and t.get("status") == "TERMINATED"]
            if members:
                ax.plot([_num(t[LAM]) for t in members], [_num(t.get(metric)) for t in members], ".", color=colour, alpha=0.35, ms=7,
                    label=f"single seeds{suffix}")
            zero = [r for r in rows if _num(r.get(LAM)) == 0]
            if zero:
                m, s = _num(zero[0].get(f"{metric}_mean")), _num(zero[0].get(f"{metric}_std"))
                ax.axhline(m, color=colour, ls="--", lw=1.4, label=f"λ = 0 (ABMIL), mean ± std{suffix}")
                if not math.isnan(s) and s > 0:
                    ax.axhspan(m - s, m + s, color=colour, alpha=0.12)
                if zero[0].get("chosen"):
                    ax.annotate("λ = 0 chosen by validation", xy=(0.02, m), xycoords=("axes fraction", "data"), fontsize=8, va="bottom")
        ax.set_xscale("log")
        if positive:
            ax.set_xticks(positive, [f"{v:g}" for v in positive])
            ax.xaxis.set_minor_formatter(NullFormatter())
            lo, hi = min(positive), max(positive)
            ax.set_xlim(lo / 2, hi * 2)
        ax.set_xlabel("λ (AEM weight, log scale; λ = 0 drawn as the dashed line)")
        ax.set_ylabel(f"{name} (0-1)")
        unit_ylim(ax)
        ax.set_title(f"{name} vs λ")
        ax.grid(alpha=0.3, which="both")
    # One legend for both panels, under them, so it never hides a point.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=4 if len(groups) == 1 else 2, fontsize=8, frameon=False)
    fig.suptitle(title or "λ sensitivity (test set; λ chosen by validation)")
    return fig


def pearson(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Pearson's r and its two-sided p-value; NaN when fewer than 3 points or a constant variable."""
    from scipy import stats

    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = ~(np.isnan(xs) | np.isnan(ys))
    xs, ys = xs[ok], ys[ok]
    if len(xs) < 3 or np.ptp(xs) == 0 or np.ptp(ys) == 0:
        return math.nan, math.nan
    res = stats.pearsonr(xs, ys)
    return float(res.statistic), float(res.pvalue)


def entropy_vs_auc(trials: Sequence[Mapping[str, Any]], title: str = "") -> tuple[Figure, float, float]:
    """Scatter of test attention entropy (nats) vs test AUC per trial, coloured by λ; returns (fig, r, p)."""
    done = [t for t in trials if not math.isnan(_num(t.get("test_attn_entropy"))) and not math.isnan(_num(t.get("test_auc")))]
    x = [_num(t["test_attn_entropy"]) for t in done]
    y = [_num(t["test_auc"]) for t in done]
    r, p = pearson(x, y)
    fig = new_figure(6.4, 4.8)
    ax = fig.subplots()
    lams = sorted({_num(t.get(LAM)) for t in done}, key=lambda v: (math.isnan(v), v))
    for colour, lam in zip(_colours(len(lams)), lams):
        pts = [(a, b) for a, b, t in zip(x, y, done) if _num(t.get(LAM)) == lam or (math.isnan(lam) and math.isnan(_num(t.get(LAM))))]
        ax.scatter([a for a, _ in pts], [b for _, b in pts], color=colour, s=40, edgecolor="black", lw=0.5, label=f"λ = {fmt_lam(lam)}")
    if not math.isnan(r):
        slope, icpt = np.polyfit(x, y, 1)
        xs = np.linspace(min(x), max(x), 50)
        ax.plot(xs, slope * xs + icpt, color="grey", ls="--", lw=1, label="least-squares fit")
    stat = "Pearson r undefined (< 3 trials or no spread)" if math.isnan(r) else f"Pearson r = {r:.3f} (p = {p:.3g}, n = {len(x)})"
    ax.set_title(f"{title or 'Attention entropy vs test AUC'}\n{stat}", fontsize=10)
    ax.set_xlabel("mean attention entropy per test bag (nats)")
    ax.set_ylabel("test AUC (0-1)")
    unit_ylim(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="trials", title_fontsize=8)
    return fig, r, p


FOLD = "data.fold"


def training_curves(runs: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], title: str = "", other_keys: Sequence[str] = ()) -> Figure:
    """Total train loss, its cross-entropy part, val AUC and test AUC per epoch; ``runs`` are (trials.csv
    row, results.json history).

    One row of panels per fold (when ``data.fold`` varies), colour = λ (and the other swept keys in
    ``other_keys``), line style = seed, a dot on each trial's best-validation epoch; one legend names every
    colour, line style and the marker. The CE panel leaves λ·AEM out, so runs of different λ compare on
    the loss they classify with (the total of a λ > 0 run goes below 0 as attention entropy grows).
    """
    folds = sorted({row.get(FOLD) for row in runs_rows(runs)}, key=lambda v: (v is None, str(v)))
    fig = new_figure(18, 3.9 * len(folds) + 0.9)
    axes = np.atleast_2d(fig.subplots(len(folds), 4, squeeze=False))

    def colour_key(row: Mapping[str, Any]) -> str:
        lam = f"λ = {fmt_lam(row.get(LAM))}"
        other = group_label(row, other_keys)
        return f"{lam}, {other}" if other else lam

    order = {colour_key(row): (math.inf if math.isnan(_num(row.get(LAM))) else _num(row.get(LAM)), group_label(row, other_keys)) for row, _ in runs}
    keys = sorted(order, key=order.__getitem__)
    colour_of = dict(zip(keys, _colours(len(keys))))
    seeds = sorted({row.get(SEED) for row, _ in runs}, key=lambda v: (v is None, str(v)))
    style_of = {s: LINESTYLES[i % len(LINESTYLES)] for i, s in enumerate(seeds)}
    for row, history in runs:
        ax_row = axes[folds.index(row.get(FOLD))]
        colour, style = colour_of[colour_key(row)], style_of[row.get(SEED)]
        epochs = [h.get("epoch") for h in history]
        for ax, term in ((ax_row[0], "loss"), (ax_row[1], "ce")):
            ax.plot(epochs, [_num((h.get("train") or {}).get(term)) for h in history], color=colour, ls=style, lw=1.4)
        best = row.get("best_epoch")
        for ax, split in ((ax_row[2], "val"), (ax_row[3], "test")):
            pts = [(h.get("epoch"), _num((h.get(split) or {}).get("auc"))) for h in history if h.get(split)]
            ax.plot([e for e, _ in pts], [v for _, v in pts], color=colour, ls=style, lw=1.4, marker="." if len(pts) < 30 else None)
            at_best = [v for e, v in pts if e == best]
            if at_best:
                ax.plot([best], at_best, "o", color=colour, mec="black", ms=7)
    panels = (
        ("train loss (total)", "CE + λ·Σ a log a (nats)"),
        ("train cross-entropy", "CE (nats)"),
        ("validation AUC", "AUC (0-1)"),
        ("test AUC", "AUC (0-1)"),
    )
    for fold, ax_row in zip(folds, axes):
        for i, (ax, (name, unit)) in enumerate(zip(ax_row, panels)):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_title(name if fold is None else f"{name}, fold {fold}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(unit)
            ax.grid(alpha=0.3)
            if i >= 2:
                unit_ylim(ax)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colour_of[k], lw=2, label=k) for k in keys]
    handles += [Line2D([], [], color="black", ls=style_of[s], lw=1.4, label=f"seed {s}") for s in seeds]
    handles.append(Line2D([], [], color="white", marker="o", mec="black", ms=7, ls="none", label="best-validation epoch"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 6), fontsize=8, frameon=False)
    encodings = "colour: λ" + (f" ({', '.join(other_keys)})" if other_keys else "") + ", line style: seed" + (", rows: fold" if folds != [None] else "")
    fig.suptitle(f"{title or 'Training curves per trial'} ({encodings})")
    return fig


def runs_rows(runs: Sequence[tuple[Mapping[str, Any], Any]]) -> list[Mapping[str, Any]]:
    return [row for row, _ in runs]


def concentration(curves: Sequence[tuple[str, np.ndarray, np.ndarray, int, str]], grid: np.ndarray, title: str = "") -> Figure:
    """Cumulative attention vs fraction of top-ranked instances (log x, in %).

    ``curves``: (label, mean curve over trials, std over trials, number of trials, what they are — e.g.
    "3 folds × 2 seeds") per λ shown.
    """
    fig = new_figure(7, 4.8)
    ax = fig.subplots()
    pct = np.asarray(grid) * 100
    for colour, (label, mean, std, n, what) in zip(_colours(len(curves)), curves):
        ax.plot(pct, mean, color=colour, lw=2, label=f"{label} (mean of {what})")
        if n > 1:
            ax.fill_between(pct, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), color=colour, alpha=0.2)
    ax.plot(pct, np.asarray(grid), color="black", ls=":", lw=1, label="uniform attention")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("top-ranked instances (% of each bag, log scale)")
    ax.set_ylabel("cumulative attention (fraction of the bag's total)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")
    ax.set_title(title or "Attention concentration on the test set (mean over bags; band: ± std over trials)", fontsize=10)
    return fig


def embedding_maps(maps: Sequence[tuple[str, Any]], class_names: Sequence[str], title: str = "") -> Figure:
    """Fig. 11: one panel per model (λ = 0, chosen λ), its test bags' UMAP coloured by true class, the
    V-measure of the k-means clustering in the title. ``maps``: (label, observe.embeddings.EmbeddingMap)."""
    fig = new_figure(5.2 * len(maps), 4.8)
    axes = np.atleast_1d(fig.subplots(1, len(maps)))
    colours = _colours(len(class_names))
    for ax, (label, m) in zip(axes, maps):
        for c, name in enumerate(class_names):
            sel = m.labels == c
            if sel.any():
                ax.scatter(m.xy[sel, 0], m.xy[sel, 1], s=22, color=colours[c], alpha=0.8, edgecolors="none", label=f"{name} ({int(sel.sum())})")
        ax.set_title(f"{label}\nV-measure (k-means, k = {len(class_names)}) = {m.v_measure:.3f}", fontsize=9)
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=8, loc="best", title="true class", title_fontsize=8)
    fig.suptitle(title or "UMAP of test-bag embeddings (Fig. 11)")
    return fig
