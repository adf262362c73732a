"""No p-value the data cannot carry (fewer than 3 values or pairs, no variance), and one fixed tie rule
for the chosen λ — on hand-made trial rows."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from aem_dist.observe.tables import MIN_VALUES, compare_to_base, read_csv, summarize, write_tables

SWEPT = ["loss.lam", "train.seed"]


def _row(lam, seed, test, val=0.8, f1=None):
    return {"trial": f"lam={lam}_seed={seed}", "status": "TERMINATED", "loss.lam": lam, "train.seed": seed,
            "test_auc": test, "test_f1": test if f1 is None else f1, "val_auc": val, "val_f1": val, "test_attn_entropy": 1.0}  # fmt: skip


def test_no_p_value_from_two_seeds(tmp_path):
    # the demo's case: 2 seeds whose F1 are identical within each λ gave p = 3e-05 before
    rows = [_row(0.0, 0, 0.90, f1=0.937), _row(0.0, 1, 0.91, f1=0.937), _row(0.01, 0, 0.92, f1=0.958), _row(0.01, 1, 0.93, f1=0.958)]
    summary = write_tables(str(tmp_path), rows, SWEPT)
    lam = summary[1]
    assert math.isnan(lam["p_test_auc_vs_lam0"]) and math.isnan(lam["p_test_f1_vs_lam0"])
    assert lam["p_test_auc_note"] == f"2 pairs (fewer than {MIN_VALUES})"
    md = (tmp_path / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 0.01 |"))
    assert row.endswith("| – | – |  |")  # both p columns
    assert "- loss.lam = 0.01, p(AUC): –, 2 pairs (fewer than 3)" in md and "- loss.lam = 0.01, p(F1): –, 2 pairs (fewer than 3)" in md
    back = read_csv(str(tmp_path / "summary.csv"))[1]
    assert back["p_test_auc_vs_lam0"] is None and back["p_test_f1_note"] == "2 pairs (fewer than 3)"


def test_no_p_value_without_variance():
    base = [_row(0.0, s, 0.80 + 0.01 * s) for s in range(4)]
    same = [_row(0.1, s, 0.80 + 0.01 * s) for s in range(4)]  # every paired difference 0 (p = 1 before)
    shifted = [_row(0.2, s, 0.85 + 0.01 * s) for s in range(4)]  # every paired difference +0.05 (p = 0 before)
    summary = {r["loss.lam"]: r for r in summarize(base + same + shifted, SWEPT)}
    assert math.isnan(summary[0.1]["p_test_auc_vs_lam0"]) and summary[0.1]["p_test_auc_note"] == "no variance: every paired difference is +0"
    assert math.isnan(summary[0.2]["p_test_auc_vs_lam0"]) and summary[0.2]["p_test_auc_note"].startswith("no variance: every paired difference is +0.05")


def test_three_pairs_give_the_paired_test():
    base = [_row(0.0, s, v) for s, v in enumerate((0.80, 0.83, 0.78))]
    aem = [_row(0.1, s, v) for s, v in enumerate((0.84, 0.85, 0.83))]
    p, note = compare_to_base(aem, base, "test_auc")
    assert p == pytest.approx(stats.ttest_rel([0.84, 0.85, 0.83], [0.80, 0.83, 0.78]).pvalue, rel=1e-12)
    assert note == "paired over 3 (fold, seed) pairs"
    # groups without a shared seed are compared unpaired, and only with 3 values each
    other = [_row(0.1, s + 10, v) for s, v in enumerate((0.84, 0.85, 0.83))]
    p, note = compare_to_base(other, base, "test_auc")
    assert p == pytest.approx(stats.ttest_ind([0.84, 0.85, 0.83], [0.80, 0.83, 0.78]).pvalue, rel=1e-12) and note.startswith("unpaired")
    p, note = compare_to_base(other[:2], base, "test_auc")
    assert math.isnan(p) and "fewer than 3" in note


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0)])
def test_ties_go_to_the_smallest_lambda(order):
    """Equal mean validation scores: the smallest λ wins (λ = 0 wins ties), whatever the row order."""
    lams = (0.0, 0.01, 0.1)
    # the means tie up to rounding: (0.9 + 0.7) / 2 vs (0.7 + 0.9) / 2 computed in another order
    vals = {0.0: (0.9, 0.7), 0.01: (0.7, 0.9), 0.1: (0.7, 0.9)}
    rows = [_row(lams[i], s, 0.5, val=vals[lams[i]][s]) for i in order for s in (0, 1)]
    summary = summarize(rows, SWEPT)
    assert [r["loss.lam"] for r in summary if r["chosen"]] == [0.0]
    # without λ = 0 the next smallest wins
    rows = [r for r in rows if r["loss.lam"] != 0.0]
    assert [r["loss.lam"] for r in summarize(rows, SWEPT) if r["chosen"]] == [0.01]
    # a better score still wins over a smaller λ
    rows.append(_row(0.5, 0, 0.5, val=0.95))
    rows.append(_row(0.5, 1, 0.5, val=0.95))
    assert [r["loss.lam"] for r in summarize(rows, SWEPT) if r["chosen"]] == [0.5]
