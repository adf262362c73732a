"""Sweep result tables: ``trials.csv`` (one row per trial) and ``summary.csv`` / ``summary.md`` (per λ).

The summary groups trials by every swept key except ``train.seed`` (and ``data.fold``) and reports,
per group, mean ± std over seeds (sample std, ddof=1) of test AUC and F1 — the paper's presentation —
plus the validation means used to choose λ (the λ with the best mean val AUC + val F1 among groups that
agree on every other swept key; never chosen by test; a tie goes to the smallest λ, see
:func:`_mark_chosen`) and a p-value of test AUC and F1 against λ = 0 of the same group.

Every λ trains the same seeds (and folds), and a (fold, seed) fixes the initialisation, data order and
fold, so the test vs λ = 0 is **paired** (``scipy.stats.ttest_rel``) over the (fold, seed) pairs both
groups finished — with or without folds. No p-value from fewer than 3 pairs or from differences without
variance (see :func:`compare_to_base`); the reason goes into ``p_*_note`` and the footnote of
summary.md. Cross-validation: when ``data.fold`` is swept, a group's trials are its folds × seeds and the
mean ± std runs over all of them; ``summary_folds.csv`` and a per-fold table in ``summary.md`` give each
fold's mean ± std over seeds.

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
    # epochs trained: a stopped trial's record says, so does train.patience's stop; a finished one ran them all
    stopped = results.get("stopped_after_epoch")
    row["epochs"] = results.get("epochs", stopped + 1 if stopped is not None else ((results.get("config") or {}).get("train") or {}).get("epochs"))
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


MIN_VALUES = 3  # fewest values per group (or pairs) a p-value is computed from
NO_SPREAD = 1e-12  # a spread this small is rounding: equal metrics computed in a different order
TIE_TOLERANCE = 1e-9  # mean validation scores closer than this are a tie (AUC/F1 means differ by rounding only)


def _finite_values(values: Iterable[Any]) -> list[float]:
    return [float(x) for x in values if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)]


def compare_to_base(members: Sequence[dict[str, Any]], base: Sequence[dict[str, Any]], col: str) -> tuple[float, str]:
    """p-value of ``col`` between a group's trials and λ = 0's, and a note: which test, or why none.

    Trials that share (fold, seed) pair up — same fold, same initialisation and data order — so the
    test is paired (``scipy.stats.ttest_rel``) over the pairs both groups finished. Only groups with no
    pair in common fall back to the unpaired two-sample t-test (``scipy.stats.ttest_ind``). No p-value
    (NaN) from fewer than :data:`MIN_VALUES` pairs or values per group, nor when there is no variance
    (all paired differences equal; both groups constant): a t statistic is then undefined or infinite,
    and a p-value would claim what a handful of identical numbers cannot show."""

    def by_pair(rows: Sequence[dict[str, Any]]) -> dict[tuple, float]:
        return {tuple(r.get(k) for k in PAIR_KEYS): float(r[col]) for r in rows if _finite_values([r.get(col)])}

    pa, pb = by_pair(members), by_pair(base)
    keyed = all(any(r.get(k) is not None for k in PAIR_KEYS) for r in (*members, *base))  # seed or fold swept
    common = sorted(set(pa) & set(pb), key=str) if keyed else []
    if common:
        if len(common) < MIN_VALUES:
            return math.nan, f"{len(common)} pair{'s' if len(common) != 1 else ''} (fewer than {MIN_VALUES})"
        x, y = np.array([pa[c] for c in common]), np.array([pb[c] for c in common])
        d = x - y
        if np.ptp(d) <= NO_SPREAD:
            return math.nan, f"no variance: every paired difference is {d[0]:+.4g}"
        return float(stats.ttest_rel(x, y).pvalue), f"paired over {len(common)} (fold, seed) pairs"
    a, b = _finite_values(r.get(col) for r in members), _finite_values(r.get(col) for r in base)
    if min(len(a), len(b)) < MIN_VALUES:
        return math.nan, f"{min(len(a), len(b))} value(s) in a group (fewer than {MIN_VALUES})"
    if np.ptp(a) <= NO_SPREAD and np.ptp(b) <= NO_SPREAD:
        return math.nan, "no variance: both groups constant"
    return float(stats.ttest_ind(a, b, equal_var=True).pvalue), f"unpaired ({len(a)} and {len(b)} values, no shared seed)"


def group_keys_of(swept_keys: Sequence[str]) -> list[str]:
    """The keys a summary row is grouped by: every swept key but the seed and the fold."""
    return [k for k in swept_keys if k not in PAIR_KEYS]


def summarize(rows: Sequence[dict[str, Any]], swept_keys: Sequence[str], searched: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per group (all swept keys but seed and fold): n, mean ± std of test AUC/F1 over seeds (× folds),
    val means, p vs λ=0 (paired over (fold, seed), with a note saying which test or why none), chosen.

    Trials a scheduler stopped early (status STOPPED_EARLY) are counted in ``stopped_early`` and kept out
    of the means; a group with one of them is never chosen. ``searched``: keys a search drew (chosen over,
    like λ, rather than grouped by)."""
    group_keys = group_keys_of(swept_keys)
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
                row[f"p_{col}_vs_lam0"], row[f"p_{col}_note"] = math.nan, ""
            else:
                row[f"p_{col}_vs_lam0"], row[f"p_{col}_note"] = compare_to_base(members, base_members, col)
        out.append(row)
    _mark_chosen(out, [k for k in group_keys if k not in searched])
    return out


def _same(a: tuple, b: tuple) -> bool:
    return all((x == y) or (isinstance(x, (int, float)) and isinstance(y, (int, float)) and float(x) == float(y)) for x, y in zip(a, b))


def _mark_chosen(summary: list[dict[str, Any]], group_keys: Sequence[str]) -> None:
    """``chosen`` = best mean validation score among rows that agree on every key of ``group_keys`` except
    λ — and only among rows none of whose trials was stopped early: a stopped trial never reached the final
    epoch, so neither it nor a mean it would leave a hole in can give the chosen λ.

    Tie rule: scores within :data:`TIE_TOLERANCE` of the best tie, and the **smallest λ** among them wins
    (λ = 0 wins every tie: AEM has to beat plain training to be chosen), then the first row in the
    summary's order (sorted by the swept values) — never the order trials happened to finish in."""
    others = [k for k in group_keys if k != LAM_KEY]
    by_rest: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in summary:
        by_rest[tuple(row.get(k) for k in others)].append(row)
    for rows in by_rest.values():
        scored = [r for r in rows if not math.isnan(r["val_score_mean"]) and not r.get("stopped_early")]
        top = max((r["val_score_mean"] for r in scored), default=math.nan)
        tied = [(i, r) for i, r in enumerate(scored) if r["val_score_mean"] >= top - TIE_TOLERANCE]
        best = min(tied, key=lambda ir: (_lam_order(ir[1].get(LAM_KEY)), ir[0]))[1] if tied else None
        for r in rows:
            r["chosen"] = r is best


def _lam_order(lam: Any) -> float:
    return float(lam) if isinstance(lam, (int, float)) and not isinstance(lam, bool) and not math.isnan(lam) else math.inf


def summary_columns(group_keys: Sequence[str]) -> list[str]:
    cols = [*group_keys, "n"]
    for col in ("test_auc", "test_f1", "val_auc", "val_f1", "test_attn_entropy"):
        cols += [f"{col}_mean", f"{col}_std"]
    return cols + ["val_score_mean", "p_test_auc_vs_lam0", "p_test_f1_vs_lam0", "p_test_auc_note", "p_test_f1_note", "stopped_early", "chosen"]


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
    over = "every (fold, seed) trial" if folds else "seeds"
    # one sentence a line (Markdown joins them): the summary is printed to consoles too
    lines += ["", f"Mean ± sample std over {over}; λ chosen by mean validation AUC + F1 (never by test).",
              f"A tie (within {TIE_TOLERANCE:g}) goes to the smallest λ, so λ = 0 wins ties.",
              "p-values vs λ = 0: paired t-test (scipy.stats.ttest_rel) over the (fold, seed) pairs both finished (every λ trains the same folds and seeds);",
              f"none (–) from fewer than {MIN_VALUES} pairs or from paired differences without variance."]
    lines += _p_footnotes(summary, group_keys)
    if folds:
        lines += ["", "## Per fold (mean ± std over seeds)", "", folds_markdown(per_fold or [], group_keys).rstrip()]
    if stops:
        lines += ["", "stopped early: trials the sweep's scheduler (ASHA) stopped before their last epoch (status STOPPED_EARLY in trials.csv);",
                  "they are left out of the means and seeds, and a row with any of them is never chosen."]
    return "\n".join(lines) + "\n"


def _p_footnotes(summary: Sequence[dict[str, Any]], group_keys: Sequence[str]) -> list[str]:
    """Why a row shows no p-value (or which other test it got), one line per row and metric."""
    notes = []
    for r in summary:
        label = ", ".join(f"{k} = {r.get(k)}" for k in group_keys)
        for col, name in (("test_auc", "AUC"), ("test_f1", "F1")):
            note, p = r.get(f"p_{col}_note") or "", r.get(f"p_{col}_vs_lam0")
            if note and (p is None or (isinstance(p, float) and math.isnan(p)) or note.startswith("unpaired")):
                notes.append(f"- {label}, p({name}): {'–, ' if not note.startswith('unpaired') else ''}{note}")
    return ["", *notes] if notes else []


def write_trials_csv(out: str, rows: Sequence[dict[str, Any]], swept_keys: Sequence[str], options: StorageOptions | None = None) -> None:
    """trials.csv alone (an interrupted sweep: no summary of a half-finished grid)."""
    storage.atomic_write_text(storage.join(out, "trials.csv"), to_csv(rows, _columns(rows, swept_keys)), options)


def write_tables(
    out: str, rows: Sequence[dict[str, Any]], swept_keys: Sequence[str], options: StorageOptions | None = None, searched: Sequence[str] = ()
) -> list[dict[str, Any]]:
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
