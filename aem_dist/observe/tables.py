"""Sweep result tables: ``trials.csv`` (one row per trial) and ``summary.csv`` / ``summary.md`` (per λ).

The summary groups trials by every swept key except ``train.seed`` (and ``data.fold``) and reports,
per group, mean ± std over seeds (sample std, ddof=1) of test AUC and F1 — the paper's presentation —
plus the validation means used to choose λ (the λ with the best mean val AUC + val F1 among groups that
agree on every other swept key; never chosen by test) and an unpaired two-sample Student t-test p-value
of test AUC and F1 against λ = 0 of the same group.

Cross-validation: when ``data.fold`` is swept, a group's trials are its folds × seeds and the mean ±
std runs over all of them. Every λ is trained on the same folds with the same seeds, so the test vs
λ = 0 is a **paired** t-test (``scipy.stats.ttest_rel``) over the (fold, seed) pairs both groups
finished; ``summary_folds.csv`` and a per-fold table in ``summary.md`` give each fold's mean ± std
over seeds.

Searches and early stopping: a trial a scheduler (``sweep.scheduler: asha``) stopped before its last
epoch has status ``STOPPED_EARLY`` in trials.csv (``epochs`` says how many it trained); the summary
counts such trials per row (``stopped_early``), leaves them out of the means, and never marks a row
with one of them as chosen. For a random/optuna search, the drawn keys (``searched``) are chosen over,
like λ: the chosen row is the one best by mean validation score among all rows.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from typing import Any, Iterable, Sequence

import numpy as np
from scipy import stats

from .. import storage
from ..storage import StorageOptions

SEED_KEY = "train.seed"
FOLD_KEY = "data.fold"
LAM_KEY = "loss.lam"
PAIR_KEYS = (FOLD_KEY, SEED_KEY)  # what identifies a trial within a group; pairs it across λ
SPLIT_COLUMNS = ("auc", "f1", "acc", "balanced_acc", "attn_entropy", "attn_entropy_norm", "attn_top1pct")
STOPPED_EARLY = "STOPPED_EARLY"  # the status of a trial a scheduler (ASHA) stopped before its last epoch
TRIAL_COLUMNS = ("trial", "status", "best_epoch", "epochs", *(f"{s}_{m}" for s in ("val", "test") for m in SPLIT_COLUMNS), "wall_s", "path")


def trial_row(trial: str, swept: dict[str, Any], results: dict[str, Any] | None, *, status: str, wall_s: float | None, path: str = "") -> dict[str, Any]:
    """One ``trials.csv`` row from a trial's swept values and its ``results.json`` content (None if it failed)."""
    row: dict[str, Any] = {"trial": trial, "status": status, **swept}
    results = results or {}
    row["best_epoch"] = results.get("best_epoch")
    # epochs trained: a stopped trial's record says; a finished one ran them all
    row["epochs"] = results.get("epochs", ((results.get("config") or {}).get("train") or {}).get("epochs"))
    for split in ("val", "test"):
        metrics = results.get(split) or {}
        for m in SPLIT_COLUMNS:
            row[f"{split}_{m}"] = metrics.get(m)
    row["wall_s"] = None if wall_s is None else round(float(wall_s), 3)
    row["path"] = path
    return row


def _columns(rows: Sequence[dict[str, Any]], swept_keys: Sequence[str]) -> list[str]:
    return ["trial", "status", *swept_keys, *[c for c in TRIAL_COLUMNS if c not in ("trial", "status")]]


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return str(value)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def _parse(value: str) -> Any:
    if value == "":
        return None
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    if value in ("True", "False"):
        return value == "True"
    return value


def read_csv(url: str, options: StorageOptions | None = None) -> list[dict[str, Any]]:
    text = storage.read_bytes(url, options).decode("utf-8")
    return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]


def _mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    v = np.array([x for x in values if isinstance(x, (int, float)) and not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _ttest(a: Sequence[float], b: Sequence[float]) -> float:
    a = [x for x in a if isinstance(x, (int, float)) and not math.isnan(x)]
    b = [x for x in b if isinstance(x, (int, float)) and not math.isnan(x)]
    if len(a) < 2 or len(b) < 2:
        return math.nan
    if np.std(a) == 0 and np.std(b) == 0:
        return 1.0 if np.mean(a) == np.mean(b) else 0.0
    return float(stats.ttest_ind(a, b, equal_var=True).pvalue)


def _paired_ttest(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]], col: str) -> float:
    """Paired t-test of ``col`` between the trials of ``a`` and ``b`` that share (fold, seed); NaN with
    fewer than two pairs."""

    def by_pair(rows: Sequence[dict[str, Any]]) -> dict[tuple, float]:
        return {tuple(r.get(k) for k in PAIR_KEYS): r.get(col) for r in rows if isinstance(r.get(col), (int, float)) and not math.isnan(r.get(col))}

    pa, pb = by_pair(a), by_pair(b)
    common = sorted(set(pa) & set(pb), key=str)
    if len(common) < 2:
        return math.nan
    x, y = np.array([pa[c] for c in common], dtype=float), np.array([pb[c] for c in common], dtype=float)
    d = x - y
    if np.all(d == d[0]):  # no spread in the differences: the test is undefined (scipy gives NaN)
        return 1.0 if d[0] == 0 else 0.0
    return float(stats.ttest_rel(x, y).pvalue)


def group_keys_of(swept_keys: Sequence[str]) -> list[str]:
    """The keys a summary row is grouped by: every swept key but the seed and the fold."""
    return [k for k in swept_keys if k not in PAIR_KEYS]


def summarize(rows: Sequence[dict[str, Any]], swept_keys: Sequence[str], searched: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per group (all swept keys but seed and fold): n, mean ± std of test AUC/F1 over seeds (× folds),
    val means, p vs λ=0 (paired over (fold, seed) when folds are swept), chosen.

    Trials a scheduler stopped early (status STOPPED_EARLY) are counted in ``stopped_early`` and kept out
    of the means; a group with one of them is never chosen. ``searched``: keys a search drew (chosen over,
    like λ, rather than grouped by)."""
    group_keys = group_keys_of(swept_keys)
    paired = FOLD_KEY in swept_keys
    done = [r for r in rows if r.get("status") == "TERMINATED" and r.get("test_auc") is not None]
    stopped = [r for r in rows if r.get("status") == STOPPED_EARLY]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    n_stopped: dict[tuple, int] = defaultdict(int)
    for r in done:
        groups[tuple(r.get(k) for k in group_keys)].append(r)
    for r in stopped:
        key = tuple(r.get(k) for k in group_keys)
        n_stopped[key] += 1
        groups.setdefault(key, [])
    out: list[dict[str, Any]] = []
    for key in sorted(groups, key=lambda k: tuple((v is None, str(type(v)), v) for v in k)):
        members = groups[key]
        row: dict[str, Any] = dict(zip(group_keys, key))
        row["n"] = len(members)
        row["stopped_early"] = n_stopped[key]
        for col in ("test_auc", "test_f1", "val_auc", "val_f1", "test_attn_entropy"):
            row[f"{col}_mean"], row[f"{col}_std"], _ = _mean_std(m.get(col) for m in members)
        row["val_score_mean"] = row["val_auc_mean"] + row["val_f1_mean"]
        base_key = tuple(0.0 if k == LAM_KEY else v for k, v in zip(group_keys, key))
        base = [g for k2, g in groups.items() if LAM_KEY in group_keys and _same(k2, base_key)]
        base_members = base[0] if base else []
        for col in ("test_auc", "test_f1"):
            if not base_members or base_members is members:
                row[f"p_{col}_vs_lam0"] = math.nan
            elif paired:
                row[f"p_{col}_vs_lam0"] = _paired_ttest(members, base_members, col)
            else:
                row[f"p_{col}_vs_lam0"] = _ttest([m.get(col) for m in members], [m.get(col) for m in base_members])
        out.append(row)
    _mark_chosen(out, [k for k in group_keys if k not in searched])
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all((x == y) or (isinstance(x, (int, float)) and isinstance(y, (int, float)) and float(x) == float(y)) for x, y in zip(a, b))


def _mark_chosen(summary: list[dict[str, Any]], group_keys: Sequence[str]) -> None:
    """``chosen`` = best mean validation score among rows that agree on every key of ``group_keys`` except
    λ — and only among rows none of whose trials was stopped early: a stopped trial never reached the final
    epoch, so neither it nor a mean it would leave a hole in can give the chosen λ."""
    others = [k for k in group_keys if k != LAM_KEY]
    by_rest: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in summary:
        by_rest[tuple(row.get(k) for k in others)].append(row)
    for rows in by_rest.values():
        scored = [r for r in rows if not math.isnan(r["val_score_mean"]) and not r.get("stopped_early")]
        best = max(scored, key=lambda r: r["val_score_mean"], default=None)
        for r in rows:
            r["chosen"] = r is best


def summary_columns(group_keys: Sequence[str]) -> list[str]:
    cols = [*group_keys, "n"]
    for col in ("test_auc", "test_f1", "val_auc", "val_f1", "test_attn_entropy"):
        cols += [f"{col}_mean", f"{col}_std"]
    return cols + ["val_score_mean", "p_test_auc_vs_lam0", "p_test_f1_vs_lam0", "stopped_early", "chosen"]


def summarize_folds(rows: Sequence[dict[str, Any]], swept_keys: Sequence[str]) -> list[dict[str, Any]]:
    """Per group and fold: n (seeds) and mean ± std over seeds of test/val AUC and F1 (the per-fold table)."""
    keys = [*group_keys_of(swept_keys), FOLD_KEY]
    done = [r for r in rows if r.get("status") == "TERMINATED" and r.get("test_auc") is not None]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in done:
        groups[tuple(r.get(k) for k in keys)].append(r)
    out = []
    for key in sorted(groups, key=lambda k: tuple((v is None, str(type(v)), v) for v in k)):
        row: dict[str, Any] = dict(zip(keys, key))
        row["n"] = len(groups[key])
        for col in ("test_auc", "test_f1", "val_auc", "val_f1"):
            row[f"{col}_mean"], row[f"{col}_std"], _ = _mean_std(m.get(col) for m in groups[key])
        out.append(row)
    return out


def fold_columns(group_keys: Sequence[str]) -> list[str]:
    return [*group_keys, FOLD_KEY, "n", *(f"{c}_{s}" for c in ("test_auc", "test_f1", "val_auc", "val_f1") for s in ("mean", "std"))]


def _pm(row: dict[str, Any], col: str) -> str:
    m, s = row.get(f"{col}_mean"), row.get(f"{col}_std")
    return "–" if m is None or math.isnan(m) else f"{m:.3f} ± {s:.3f}"


def folds_markdown(per_fold: Sequence[dict[str, Any]], group_keys: Sequence[str]) -> str:
    """The per-fold table (mean ± std over seeds within each fold)."""
    head = [*group_keys, "fold", "seeds", "test AUC", "test F1", "val AUC", "val F1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in per_fold:
        cells = [str(r.get(k)) for k in group_keys] + [str(r.get(FOLD_KEY)), str(r["n"]), _pm(r, "test_auc"), _pm(r, "test_f1"), _pm(r, "val_auc"),
            _pm(r, "val_f1")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(summary: Sequence[dict[str, Any]], group_keys: Sequence[str], title: str = "Sweep summary",
        per_fold: Sequence[dict[str, Any]] | None = None) -> str:
    """The per-λ table as Markdown: test AUC / F1 mean ± std over seeds, val means, p vs λ=0, the chosen λ."""

    def pm(row: dict[str, Any], col: str) -> str:
        m, s = row.get(f"{col}_mean"), row.get(f"{col}_std")
        return "–" if m is None or math.isnan(m) else f"{m:.3f} ± {s:.3f}"

    def p(v: Any) -> str:
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3g}"

    folds = per_fold is not None
    stops = any(r.get("stopped_early") for r in summary)  # a column only when a scheduler stopped something
    head = [*group_keys, "folds × seeds" if folds else "seeds", "test AUC", "test F1", "val AUC", "val F1", "p(AUC) vs λ=0", "p(F1) vs λ=0",
        *(["stopped early"] if stops else []), "chosen by val"]
    lines = [f"# {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [str(r.get(k)) for k in group_keys]
        cells += [str(r["n"]), pm(r, "test_auc"), pm(r, "test_f1"), pm(r, "val_auc"), pm(r, "val_f1"), p(r.get("p_test_auc_vs_lam0")),
            p(r.get("p_test_f1_vs_lam0"))]
        cells += [str(r.get("stopped_early") or "")] if stops else []
        cells.append("**yes**" if r.get("chosen") else "")
        lines.append("| " + " | ".join(cells) + " |")
    if folds:
        lines += ["", "Mean ± sample std over every (fold, seed) trial; λ chosen by mean validation AUC + F1 (never by test); "
                  "p-values: paired t-test vs λ = 0 over the (fold, seed) pairs both finished (scipy.stats.ttest_rel; folds and seeds are shared)."]
        lines += ["", "## Per fold (mean ± std over seeds)", "", folds_markdown(per_fold or [], group_keys).rstrip()]
    else:
        lines += ["", "Mean ± sample std over seeds; λ chosen by mean validation AUC + F1 (never by test); p-values: unpaired two-sample t-test vs λ = 0."]
    if stops:
        lines += ["", "stopped early: trials the sweep's scheduler (ASHA) stopped before their last epoch (status STOPPED_EARLY in trials.csv); "
                  "they are left out of the means and seeds, and a row with any of them is never chosen."]
    return "\n".join(lines) + "\n"


def write_tables(out: str, rows: Sequence[dict[str, Any]], swept_keys: Sequence[str], options: StorageOptions | None = None,
        searched: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Write trials.csv, summary.csv and summary.md (and, with ``data.fold`` swept, summary_folds.csv)
    under ``out``; returns the summary rows. ``searched``: the keys a random/optuna search drew."""
    group_keys = group_keys_of(swept_keys)
    storage.atomic_write_text(storage.join(out, "trials.csv"), to_csv(rows, _columns(rows, swept_keys)), options)
    summary = summarize(rows, swept_keys, searched)
    per_fold = summarize_folds(rows, swept_keys) if FOLD_KEY in swept_keys else None
    storage.atomic_write_text(storage.join(out, "summary.csv"), to_csv(summary, summary_columns(group_keys)), options)
    if per_fold is not None:
        storage.atomic_write_text(storage.join(out, "summary_folds.csv"), to_csv(per_fold, fold_columns(group_keys)), options)
    storage.atomic_write_text(storage.join(out, "summary.md"), summary_markdown(summary, group_keys, per_fold=per_fold), options)
    return summary
