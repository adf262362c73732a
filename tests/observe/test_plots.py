"""The report's figures checked without screenshots: axis limits of 0-1 metrics, legends that name every
encoding (colour, line style, marker), one row of panels per fold, Fig. 9's replicate count."""

from __future__ import annotations

import numpy as np
import pytest

from aem_dist.observe import plots
from aem_dist.observe.report import Sweep, replicates
from aem_dist.observe.tables import summarize


def _history(epochs: int, lam: float, seed: int, fold: int | None) -> list[dict]:
    rng = np.random.default_rng(seed + 10 * (fold or 0))
    out = []
    for e in range(epochs):
        ce = 0.7 * 0.8**e
        out.append({"epoch": e, "train": {"loss": ce - lam * (2 + 0.1 * e), "ce": ce, "aem": -(2 + 0.1 * e)},
                    "val": {"auc": min(1.0, 0.9 + 0.03 * e + rng.normal(0, 0.01))}, "test": {"auc": min(1.0, 0.88 + 0.04 * e)}})  # fmt: skip
    return out


def _runs(folds=(0, 1, 2), seeds=(0, 1), lams=(0.0, 0.3)):
    runs = []
    for fold in folds:
        for seed in seeds:
            for lam in lams:
                row = {"trial": f"f{fold}_s{seed}_l{lam}", "loss.lam": lam, "train.seed": seed, "best_epoch": 2}
                if fold is not None:
                    row["data.fold"] = fold
                runs.append((row, _history(5, lam, seed, fold)))
    return runs


def _legend_texts(fig) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()] + [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]


def test_training_curves_separate_folds_name_every_encoding_and_keep_auc_in_unit_interval():
    fig = plots.training_curves(_runs(), "curves")
    axes = fig.axes
    assert len(axes) == 3 * 4  # one row per fold: total loss, CE, val AUC, test AUC
    titles = [ax.get_title() for ax in axes]
    for fold in range(3):
        assert f"train loss (total), fold {fold}" in titles and f"train cross-entropy, fold {fold}" in titles and f"test AUC, fold {fold}" in titles
    texts = _legend_texts(fig)
    assert {"λ = 0", "λ = 0.3", "seed 0", "seed 1", "best-validation epoch"} <= set(texts)
    assert "line style: seed" in fig._suptitle.get_text() and "rows: fold" in fig._suptitle.get_text()
    for ax in axes:
        if "AUC" in ax.get_title():
            lo, hi = ax.get_ylim()
            assert 0.0 <= lo < hi <= 1.0, (ax.get_title(), lo, hi)
    # the CE panel is the loss without λ·AEM: no curve of a λ > 0 run goes below 0 there
    ce_axes = [ax for ax in axes if ax.get_title().startswith("train cross-entropy")]
    assert all(min(line.get_ydata().min() for line in ax.get_lines()) > 0 for ax in ce_axes)
    total = [ax for ax in axes if ax.get_title().startswith("train loss (total)")]
    assert min(line.get_ydata().min() for ax in total for line in ax.get_lines()) < 0  # λ·AEM pulls the total below 0


def test_training_curves_without_folds_is_one_row():
    fig = plots.training_curves(_runs(folds=(None,)))
    assert len(fig.axes) == 4 and fig.axes[0].get_title() == "train loss (total)"
    assert "rows: fold" not in fig._suptitle.get_text()


def _trial(lam, seed, auc, f1):
    return {"trial": f"l{lam}_s{seed}", "status": "TERMINATED", "loss.lam": lam, "train.seed": seed, "test_auc": auc, "test_f1": f1, "val_auc": auc, "val_f1": f1, "test_attn_entropy": 3 - lam}


def test_lambda_sensitivity_axes_stay_within_0_1():
    # means near 1 with a wide spread: error bars would reach past 1 (the ticks at 1.02 and 1.04 of the issue)
    trials = [_trial(lam, s, min(1.0, 0.97 + 0.03 * s), 0.5 + 0.45 * s) for lam in (0.0, 0.01, 0.1) for s in range(3)]
    summary = summarize(trials, ["loss.lam", "train.seed"])
    fig = plots.lambda_sensitivity(summary, trials, [])
    for ax in fig.axes:
        lo, hi = ax.get_ylim()
        assert 0.0 <= lo < hi <= 1.0, (ax.get_title(), lo, hi)
        assert all(0.0 <= t <= 1.0 for t in ax.get_yticks() if lo <= t <= hi)
    texts = _legend_texts(fig)
    assert any(t.startswith("AEM, mean ± std") for t in texts) and any(t.startswith("λ = 0 (ABMIL)") for t in texts)
    fig, _, _ = plots.entropy_vs_auc(trials)
    lo, hi = fig.axes[0].get_ylim()
    assert 0.0 <= lo < hi <= 1.0
    assert {f"λ = {v:g}" for v in (0.0, 0.01, 0.1)} <= set(_legend_texts(fig))


def test_concentration_legend_counts_folds_times_seeds():
    trials = [{"trial": f"f{f}_s{s}", "data.fold": f, "train.seed": s} for f in range(3) for s in range(2)]
    sweep = Sweep("x", "x", trials, ["data.fold", "loss.lam", "train.seed"], [], ["loss.lam"], {}, {})
    assert replicates(sweep, [t["trial"] for t in trials]) == "6 trials (3 folds × 2 seeds)"
    assert replicates(Sweep("x", "x", [{"trial": "a", "train.seed": 0}, {"trial": "b", "train.seed": 1}], [], [], [], {}, {}), ["a", "b"]) == "2 seeds"
    grid = np.linspace(0.01, 1, 20)
    curve = np.sqrt(grid)
    fig = plots.concentration([("λ = 0 (ABMIL)", curve, curve * 0.05, 6, "6 trials (3 folds × 2 seeds)"), ("λ = 0.1 (chosen by validation)", grid, grid * 0.0, 6, "6 trials (3 folds × 2 seeds)")], grid)
    texts = _legend_texts(fig)
    assert "λ = 0 (ABMIL) (mean of 6 trials (3 folds × 2 seeds))" in texts and "uniform attention" in texts
    assert not any("seeds)" in t and "mean of 6 seeds" in t for t in texts)
    assert fig.axes[0].get_ylim() == pytest.approx((0.0, 1.0))
