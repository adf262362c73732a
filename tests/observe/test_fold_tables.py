"""Summaries over cross-validation folds: mean ± std over folds × seeds, the per-fold table, and the
paired test vs λ = 0 — checked against a hand computation from synthetic trial rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from aem_dist.observe.tables import read_csv, summarize, write_tables

SWEPT = ["data.fold", "loss.lam", "train.seed"]


def _rows():
    rng = np.random.default_rng(0)
    rows = []
    for fold in range(3):
        for lam in (0.0, 0.1):
            for seed in (0, 1):
                auc = 0.7 + 0.05 * fold + (0.03 if lam else 0.0) + rng.normal(0, 0.01)
                rows.append({
                    "trial": f"t_{fold}_{lam}_{seed}", "status": "TERMINATED", "data.fold": fold, "loss.lam": lam, "train.seed": seed,
                    "test_auc": auc, "test_f1": auc - 0.1 + rng.normal(0, 0.01), "val_auc": auc + rng.normal(0, 0.01), "val_f1": 0.6 + rng.normal(0, 0.01),
                })
    return rows


def _pick(rows, **eq):
    return [r for r in rows if all(r[k.replace("__", ".")] == v for k, v in eq.items())]


def test_fold_summary_equals_hand_computation(tmp_path):
    rows = _rows()
    summary = write_tables(str(tmp_path), rows, SWEPT)
    assert [r["loss.lam"] for r in summary] == [0.0, 0.1]  # grouped over folds and seeds
    for row in summary:
        mine = [r["test_auc"] for r in rows if r["loss.lam"] == row["loss.lam"]]
        assert row["n"] == 6
        assert row["test_auc_mean"] == pytest.approx(np.mean(mine), abs=1e-12)
        assert row["test_auc_std"] == pytest.approx(np.std(mine, ddof=1), abs=1e-12)
    # Paired over (fold, seed): t = mean(d) / (sd(d) / sqrt(n)), two-sided.
    key = lambda r: (r["data.fold"], r["train.seed"])  # noqa: E731
    a = {key(r): r["test_auc"] for r in rows if r["loss.lam"] == 0.1}
    b = {key(r): r["test_auc"] for r in rows if r["loss.lam"] == 0.0}
    d = np.array([a[k] - b[k] for k in sorted(a)])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p_hand = 2 * stats.t.sf(abs(t), len(d) - 1)
    lam1 = summary[1]
    assert lam1["p_test_auc_vs_lam0"] == pytest.approx(p_hand, rel=1e-9)
    # ... and it is not the unpaired test (the fold effect dominates the unpaired variance).
    assert lam1["p_test_auc_vs_lam0"] != pytest.approx(stats.ttest_ind(list(a.values()), list(b.values())).pvalue, rel=1e-3)
    assert math.isnan(summary[0]["p_test_auc_vs_lam0"])

    # The per-fold table: mean ± std over seeds within each (λ, fold).
    per_fold = read_csv(str(tmp_path / "summary_folds.csv"))
    assert len(per_fold) == 6
    for r in per_fold:
        mine = [x["test_auc"] for x in rows if x["loss.lam"] == r["loss.lam"] and x["data.fold"] == r["data.fold"]]
        assert r["n"] == 2 and r["test_auc_mean"] == pytest.approx(np.mean(mine), abs=1e-9)
        assert r["test_auc_std"] == pytest.approx(np.std(mine, ddof=1), abs=1e-9)
    md = (tmp_path / "summary.md").read_text()
    assert "folds × seeds" in md and "paired t-test" in md and "## Per fold" in md
    assert md.count("\n| 0.1 | ") == 1 + 3  # the summary row and three per-fold rows


def test_paired_test_uses_only_pairs_both_finished():
    rows = _rows()
    rows = [r for r in rows if not (r["loss.lam"] == 0.1 and r["data.fold"] == 2 and r["train.seed"] == 1)]  # one trial failed
    lam1 = summarize(rows, SWEPT)[1]
    a = {(r["data.fold"], r["train.seed"]): r["test_auc"] for r in rows if r["loss.lam"] == 0.1}
    b = {(r["data.fold"], r["train.seed"]): r["test_auc"] for r in rows if r["loss.lam"] == 0.0}
    keys = sorted(a)
    assert lam1["n"] == 5
    assert lam1["p_test_auc_vs_lam0"] == pytest.approx(stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue, rel=1e-12)


def test_without_folds_seeds_pair_up(tmp_path):
    """Without folds the seeds still pair up across λ (same initialisation and data order): paired t-test."""
    rows = [r for r in _rows() if r["data.fold"] == 0]
    for r in rows:
        del r["data.fold"]
    rows += [dict(r, trial=r["trial"] + "_s2", **{"train.seed": 2, "test_auc": r["test_auc"] + 0.004 * (1 + r["loss.lam"])}) for r in rows if r["train.seed"] == 0]
    summary = write_tables(str(tmp_path), rows, ["loss.lam", "train.seed"])
    a = {r["train.seed"]: r["test_auc"] for r in rows if r["loss.lam"] == 0.1}
    b = {r["train.seed"]: r["test_auc"] for r in rows if r["loss.lam"] == 0.0}
    assert summary[1]["p_test_auc_vs_lam0"] == pytest.approx(stats.ttest_rel([a[k] for k in sorted(a)], [b[k] for k in sorted(a)]).pvalue, rel=1e-12)
    assert summary[1]["p_test_auc_note"] == "paired over 3 (fold, seed) pairs"
    assert not (tmp_path / "summary_folds.csv").exists() and "paired t-test" in (tmp_path / "summary.md").read_text()
