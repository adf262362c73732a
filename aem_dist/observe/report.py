"""``aem-dist report URL``: ``report.md`` and PNG plots next to a sweep's (or a run's) results.

Input: a sweep folder as the sweep writes it — ``trials.csv``, ``summary.csv``, ``run.json`` and
``trials/<trial>/{results.json,best/state.pt}`` — or a single train run folder (``results.json``,
``best/state.pt``), on any URL :mod:`aem_dist.storage` reads. Output, in the same folder::

    report.md                          the summary table, a per-trial table, the plots with captions
    plots/lambda_sensitivity.png       test AUC / F1 mean ± std vs λ (Fig. 5)
    plots/entropy_vs_auc.png           attention entropy vs test AUC, Pearson r (Fig. 3)
    plots/training_curves.png          train loss / CE / val AUC / test AUC per epoch per trial, per fold (Fig. 8)
    plots/attention_concentration.png  cumulative attention vs top-ranked fraction, λ = 0 vs chosen λ (Fig. 9)
    plots/attention_concentration.csv  the curves behind that plot
    plots/embedding_umap.png           UMAP of test-bag embeddings, λ = 0 vs chosen λ, k-means V-measure (Fig. 11)
    plots/embedding_umap.csv           the points behind that plot (model, key, label, cluster, x, y)

A plot whose inputs are missing (λ not swept, no checkpoints, fewer than two trials) is left out and
the report says why.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Mapping, Sequence

import numpy as np

from .. import __version__, storage
from ..storage import StorageOptions
from . import plots
from .figures import save_png
from .identity import check_trained_on, read_record
from .tables import FOLD_KEY, SEED_KEY, group_keys_of, read_csv, summarize, summarize_folds, summary_markdown

log = logging.getLogger(__name__)

LAM = plots.LAM
PLOTS = ("lambda_sensitivity", "entropy_vs_auc", "training_curves", "attention_concentration", "embedding_umap")


@dataclass
class Sweep:
    """What a report is built from."""

    url: str
    name: str
    trials: list[dict[str, Any]]
    swept: list[str]  # swept dotted keys, as in trials.csv
    summary: list[dict[str, Any]]
    group_keys: list[str]  # swept keys but the seed
    results: dict[str, dict[str, Any]]  # trial → results.json content
    paths: dict[str, str]  # trial → folder URL
    config: dict[str, Any] = field(default_factory=dict)  # run.json config (data.root, ...)
    per_fold: list[dict[str, Any]] | None = None  # per (group, fold) rows when data.fold is swept


@dataclass
class Report:
    url: str  # report.md
    plots: dict[str, str]  # plot name → PNG URL
    skipped: dict[str, str]  # plot name → why it was left out
    pearson_r: float = math.nan
    v_measures: dict[str, float] = field(default_factory=dict)  # Fig. 11 panel label → V-measure


def _read_json(url: str, options: StorageOptions | None) -> dict[str, Any] | None:
    return storage.read_record(url, options)


def _csv_header(url: str, options: StorageOptions | None) -> list[str]:
    text = storage.read_bytes(url, options).decode("utf-8")
    return next(csv.reader(io.StringIO(text)), [])


def _trial_folder(sweep: str, row: Mapping[str, Any], options: StorageOptions | None) -> str:
    path = row.get("path")
    if isinstance(path, str) and path and storage.exists(storage.join(path, "results.json"), options):
        return path
    return storage.join(sweep, "trials", str(row["trial"]))


def load_sweep(url: str, options: StorageOptions | None = None) -> Sweep:
    """Read a sweep folder (or a single run folder, as a sweep of one trial). FileNotFoundError names
    what is missing when ``url`` is neither."""
    run_json = _read_json(storage.join(url, "run.json"), options) or {}
    config = run_json.get("config") or {}
    trials_url = storage.join(url, "trials.csv")
    if storage.exists(trials_url, options):
        header = _csv_header(trials_url, options)
        trials = read_csv(trials_url, options)
        swept = header[header.index("status") + 1 : header.index("best_epoch")] if "status" in header and "best_epoch" in header else []
        paths = {str(t["trial"]): _trial_folder(url, t, options) for t in trials}
        results = {}
        for name, folder in paths.items():
            res = _read_json(storage.join(folder, "results.json"), options)
            if res is not None:
                results[name] = res
        summary_url = storage.join(url, "summary.csv")
        if storage.exists(summary_url, options):
            s_header = _csv_header(summary_url, options)
            group_keys = s_header[: s_header.index("n")] if "n" in s_header else group_keys_of(swept)
            summary = read_csv(summary_url, options)
        else:
            group_keys = group_keys_of(swept)
            summary = summarize(trials, swept)
    else:
        res = _read_json(storage.join(url, "results.json"), options)
        if res is None:
            raise FileNotFoundError(f"{storage.redact(url, options)}: neither a sweep (no trials.csv) nor a run (no results.json)")
        config = config or res.get("config") or {}
        name = str(url).rstrip("/").rsplit("/", 1)[-1] or "run"
        row: dict[str, Any] = {"trial": name, "status": "TERMINATED", LAM: (config.get("loss") or {}).get("lam"),
            SEED_KEY: (config.get("train") or {}).get("seed"), "best_epoch": res.get("best_epoch"), "path": url}
        for split in ("val", "test"):
            for k, v in (res.get(split) or {}).items():
                row[f"{split}_{k}"] = v
        trials, swept, results, paths = [row], [], {name: res}, {name: url}
        summary, group_keys = [], []
    name = ((config.get("run") or {}).get("name")) or str(url).rstrip("/").rsplit("/", 1)[-1]
    per_fold = summarize_folds(trials, swept) if FOLD_KEY in swept else None
    return Sweep(url, name, trials, swept, summary, group_keys, results, paths, config, per_fold)


# --- the attention concentration curves (Fig. 9) ------------------------------------------------


def _lam_of(row: Mapping[str, Any]) -> float:
    return plots._num(row.get(LAM))


def concentration_pairs(sweep: Sweep) -> tuple[list[tuple[str, list[str]]], str | None]:
    """Which trials to compare: [(label, trial names)] for λ = 0 and the chosen λ, or (.., why not)."""
    other = [k for k in sweep.group_keys if k != LAM]
    done = [t for t in sweep.trials if t.get("status") == "TERMINATED"]
    if not done:
        return [], "no finished trials"
    chosen_rows = [r for r in sweep.summary if r.get("chosen")]
    if not chosen_rows:  # a single run, or nothing chosen: every λ present
        lams = sorted({_lam_of(t) for t in done if not math.isnan(_lam_of(t))})
        return [(f"λ = {plots.fmt_lam(lam)}", [str(t["trial"]) for t in done if _lam_of(t) == lam]) for lam in lams], None
    chosen = chosen_rows[0]  # the first group of other swept keys (usually the only one)
    same_group = [t for t in done if all(t.get(k) == chosen.get(k) for k in other)]
    chosen_lam = _lam_of(chosen)
    if chosen_lam == 0:
        # λ = 0 won on validation: compare with the best λ > 0 by validation so the plot still shows AEM.
        rest = [r for r in sweep.summary
                if _lam_of(r) > 0 and all(r.get(k) == chosen.get(k) for k in other) and not math.isnan(plots._num(r.get("val_score_mean")))]
        if not rest:
            return [("λ = 0 (chosen)", [str(t["trial"]) for t in same_group if _lam_of(t) == 0])], None
        alt = max(rest, key=lambda r: plots._num(r.get("val_score_mean")))
        pairs = [("λ = 0 (ABMIL, chosen by validation)", 0.0), (f"λ = {plots.fmt_lam(_lam_of(alt))} (best λ > 0 by validation)", _lam_of(alt))]
    else:
        pairs = [("λ = 0 (ABMIL)", 0.0), (f"λ = {plots.fmt_lam(chosen_lam)} (chosen by validation)", chosen_lam)]
    suffix = f", {plots.group_label(chosen, other)}" if other else ""
    out = [(label + suffix, [str(t["trial"]) for t in same_group if _lam_of(t) == lam]) for label, lam in pairs]
    return [(label, names) for label, names in out if names], None


def _predicted(sweep: Sweep, name: str, *, data: str | None, split: str, options: StorageOptions | None, progress: bool, cache: dict | None) -> Any:
    """(run, bags) of trial ``name`` predicted on ``split`` of its dataset (of its fold, when it trained
    on one); None without a best checkpoint; a string saying why when the data cannot be found.
    ``cache`` (trial → result) lets Fig. 9 and Fig. 11 share one prediction per trial."""
    from ..config import DataConfig
    from .attention import load_run_model, predict_split

    if cache is not None and name in cache:
        return cache[name]
    folder = sweep.paths[name]
    if not storage.exists(storage.join(folder, "best", "state.pt"), options):
        return None
    run = load_run_model(folder, options)
    run_data = run.config.get("data") or {}
    root = data or (sweep.config.get("data") or {}).get("root") or run_data.get("root")
    if not root:
        return "no dataset location (pass --data)"
    bags = predict_split(run, root, split, options=options, data=DataConfig(fold=run_data.get("fold")), progress=progress)
    if cache is not None:
        cache[name] = (run, bags)
    return run, bags


def _first_model(sweep: Sweep, names: Sequence[str]) -> list[str]:
    """``names`` ordered by (fold, seed) so Fig. 11 shows the same fold and seed for every λ."""
    by_name = {str(t["trial"]): t for t in sweep.trials}

    def order(n: str) -> tuple:
        t = by_name.get(n, {})
        return tuple(plots._num(t.get(k)) if not math.isnan(plots._num(t.get(k))) else -1.0 for k in (FOLD_KEY, SEED_KEY))

    return sorted(names, key=order)


def embedding_maps(
    sweep: Sweep,
    *,
    data: str | None = None,
    split: str = "test",
    options: StorageOptions | None = None,
    progress: bool = False,
    cache: dict | None = None,
) -> tuple[list[tuple[str, Any]], list[str], str | None]:
    """Fig. 11: per compared λ (as Fig. 9), the UMAP + k-means V-measure of the ``split`` bags' pooled
    embeddings under ONE model — the lowest (fold, seed) trial with a checkpoint (embeddings of
    different models live in different spaces, so they are never pooled). (maps, class names, why-not)."""
    from .embeddings import embedding_map

    pairs, why = concentration_pairs(sweep)
    if why:
        return [], [], why
    maps: list[tuple[str, Any]] = []
    class_names: list[str] = []
    for label, names in pairs:
        for name in _first_model(sweep, names):
            got = _predicted(sweep, name, data=data, split=split, options=options, progress=progress, cache=cache)
            if got is None:
                continue
            if isinstance(got, str):
                return [], [], got
            run, bags = got
            if any(b.embedding is None for b in bags):
                return [], [], f"model {run.meta.get('name')!r} exposes no pooled bag embedding"
            class_names = [str(c) for c in run.meta.get("class_names") or range(int(run.meta["n_classes"]))]
            try:
                m = embedding_map([b.key for b in bags], np.stack([b.embedding for b in bags]), np.array([b.label for b in bags]), len(class_names))
            except ValueError as err:
                return [], [], str(err)
            t = {str(r["trial"]): r for r in sweep.trials}.get(name, {})
            which = ", ".join(f"{k.split('.')[-1]} {t.get(k)}" for k in (FOLD_KEY, SEED_KEY) if t.get(k) is not None)
            maps.append((f"{label}{f' [{which}]' if which else ''}", m))
            break
    if not maps:
        return [], [], "no trial has a best/state.pt checkpoint"
    return maps, class_names, None


def concentration_curves(
    sweep: Sweep,
    *,
    data: str | None = None,
    split: str = "test",
    options: StorageOptions | None = None,
    progress: bool = False,
    cache: dict | None = None,
) -> tuple[list[tuple[str, np.ndarray, np.ndarray, int, str]], np.ndarray, str | None]:
    """Mean concentration curve per compared λ (mean ± std over its trials — seeds, or folds × seeds — of
    the per-trial mean over bags), computed by predicting ``split`` with each trial's best checkpoint;
    (curves as (label, mean, std, n trials, what they are), grid, why-not)."""
    from .attention import concentration_grid, mean_concentration

    pairs, why = concentration_pairs(sweep)
    if why:
        return [], np.array([]), why
    grid = concentration_grid()
    curves = []
    for label, names in pairs:
        per_trial, used = [], []
        for name in names:
            got = _predicted(sweep, name, data=data, split=split, options=options, progress=progress, cache=cache)
            if got is None:
                continue
            if isinstance(got, str):
                return [], grid, got
            per_trial.append(mean_concentration([b.attention for b in got[1]], grid))
            used.append(name)
        if per_trial:
            arr = np.stack(per_trial)
            curves.append((label, arr.mean(axis=0), arr.std(axis=0, ddof=1) if len(arr) > 1 else np.zeros(len(grid)), len(arr), replicates(sweep, used)))
    if not curves:
        return [], grid, "no trial has a best/state.pt checkpoint"
    return curves, grid, None


def replicates(sweep: Sweep, names: Sequence[str]) -> str:
    """What ``names`` are, counted: '2 seeds', '6 trials (3 folds × 2 seeds)', '1 trial'."""
    by_name = {str(t["trial"]): t for t in sweep.trials}
    folds = {by_name.get(n, {}).get(FOLD_KEY) for n in names} - {None}
    seeds = {by_name.get(n, {}).get(SEED_KEY) for n in names} - {None}
    n = len(names)
    if folds and len(folds) * max(len(seeds), 1) == n:
        return (
            f"{n} trials ({len(folds)} fold{'s' if len(folds) != 1 else ''} × {len(seeds) or 1} seed{'s' if len(seeds) != 1 else ''})" if n != 1 else "1 trial"
        )
    if not folds and len(seeds) == n:
        return f"{n} seed{'s' if n != 1 else ''}"
    return f"{n} trial{'s' if n != 1 else ''}"


def _concentration_csv(curves: Sequence[tuple[str, np.ndarray, np.ndarray, int, str]], grid: np.ndarray) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["top_fraction", *[c for label, *_ in curves for c in (f"{label} mean", f"{label} std")]])
    for i, f in enumerate(grid):
        w.writerow([f"{f:.6g}", *[f"{v:.6g}" for _, mean, std, *_ in curves for v in (mean[i], std[i])]])
    return buf.getvalue()


# --- report.md -----------------------------------------------------------------------------------


def _cell(v: Any, digits: int = 3) -> str:
    x = plots._num(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(x):
        return f"{x:.{digits}f}" if isinstance(v, float) else str(v)
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def trials_markdown(sweep: Sweep) -> str:
    keys = [k for k in sweep.swept] or [LAM, SEED_KEY]
    head = ["trial", *keys, "status", "best epoch", "val AUC", "val F1", "test AUC", "test F1", "test entropy (nats)", "wall (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in sweep.trials:
        cells = [str(t.get("trial")), *[str(t.get(k)) for k in keys], str(t.get("status")), _cell(t.get("best_epoch")), _cell(t.get("val_auc")),
            _cell(t.get("val_f1")), _cell(t.get("test_auc")), _cell(t.get("test_f1")), _cell(t.get("test_attn_entropy")), _cell(t.get("wall_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


CAPTIONS = {
    "lambda_sensitivity": "Test AUC (left) and F1 (right), mean ± sample std over seeds, against the AEM weight λ on a log axis (the paper's Fig. 5). "
    "λ = 0 (plain ABMIL) cannot sit on a log axis: it is the dashed line with its ± std band. Faint dots are single seeds; the star is the λ chosen by mean "
    "validation AUC + F1.",
    "entropy_vs_auc": "Mean attention entropy of the test bags (nats) against test AUC, one point per trial (Fig. 3).",
    "training_curves": "Total train loss (CE + λ·AEM), its cross-entropy part, validation AUC and test AUC per epoch for every trial (Fig. 8); "
    "colour is λ, line style the seed, one row of panels per fold when folds are swept. Dots mark the best-validation epoch, "
    "whose test metrics are reported.",
    "attention_concentration": "Share of a bag's attention held by its top-ranked instances, averaged over the test bags, "
    "for λ = 0 and the chosen λ (Fig. 9); "
    "bands are ± std over the trials (seeds, or folds × seeds), the dotted line is uniform attention. "
    "A flatter curve means attention spread over more instances.",
    "embedding_umap": "UMAP (umap-learn, seeded) of the test bags' pooled embeddings z — the vector the classifier reads — for λ = 0 and the chosen λ, "
    "one model each (the lowest fold and seed), coloured by true class (the paper's Fig. 11). The V-measure scores a k-means clustering "
    "(k = number of classes, in the embedding space, not the 2-D map) against the true classes: 1 = the clusters are the classes, 0 = unrelated.",
}
TITLES = {
    "lambda_sensitivity": "λ sensitivity (Fig. 5)",
    "entropy_vs_auc": "Attention entropy vs test AUC (Fig. 3)",
    "training_curves": "Training curves (Fig. 8)",
    "attention_concentration": "Attention concentration (Fig. 9)",
    "embedding_umap": "Bag embeddings (Fig. 11)",
}


def render_markdown(sweep: Sweep, rep: Report, options: StorageOptions | None = None) -> str:
    statuses: dict[str, int] = defaultdict(int)
    for t in sweep.trials:
        statuses[str(t.get("status"))] += 1
    values = {k: sorted({str(t.get(k)) for t in sweep.trials}) for k in sweep.swept}
    lines = [
        f"# Report: {sweep.name}",
        "",
        f"- results: `{storage.redact(sweep.url, options)}`",
        f"- trials: {len(sweep.trials)} ({', '.join(f'{n} {s.lower()}' for s, n in sorted(statuses.items()))})",
    ]
    if values:
        lines.append("- swept: " + "; ".join(f"`{k}` ∈ {{{', '.join(v)}}}" for k, v in values.items()))
    lines += [f"- generated by aem-dist {__version__} on {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", ""]
    if sweep.summary:
        body = summary_markdown(sweep.summary, sweep.group_keys, per_fold=sweep.per_fold).split("\n", 2)[2]  # without its own H1
        lines += [f"## Summary (per λ, over {'folds × seeds' if sweep.per_fold is not None else 'seeds'})", "", body.strip(), ""]
    lines += ["## Trials", "", trials_markdown(sweep)]
    for name in PLOTS:
        if name in rep.plots:
            rel = f"plots/{name}.png"
            lines += [f"## {TITLES[name]}", "", f"![{TITLES[name]}]({rel})", "", CAPTIONS[name]]
            if name == "entropy_vs_auc":
                lines.append("" if math.isnan(rep.pearson_r) else f"Pearson r = {rep.pearson_r:.3f}.")
            if name == "attention_concentration":
                lines.append("Data: [plots/attention_concentration.csv](plots/attention_concentration.csv).")
            if name == "embedding_umap":
                lines.append("V-measure: " + "; ".join(f"{label}: {v:.3f}" for label, v in rep.v_measures.items()) + ". Data: "
                    "[plots/embedding_umap.csv](plots/embedding_umap.csv).")
            lines.append("")
    if rep.skipped:
        lines += ["## Plots left out", ""] + [f"- {TITLES[n]}: {why}" for n, why in rep.skipped.items()] + [""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    url: str,
    *,
    data: str | None = None,
    split: str = "test",
    options: StorageOptions | None = None,
    progress: bool = False,
) -> Report:
    """Build every plot that the results allow and ``report.md`` under ``url``; returns what was written."""
    sweep = load_sweep(url, options)
    plot_dir = storage.join(url, "plots")
    storage.makedirs(plot_dir, options)
    rep = Report(storage.join(url, "report.md"), {}, {})

    def save(name: str, fig: Any) -> None:
        rep.plots[name] = save_png(fig, storage.join(plot_dir, f"{name}.png"), options)

    lam_values = {_lam_of(r) for r in sweep.summary}
    if LAM not in sweep.group_keys or not sweep.summary:
        rep.skipped["lambda_sensitivity"] = "λ (loss.lam) is not swept"
    elif not any(v > 0 for v in lam_values):
        rep.skipped["lambda_sensitivity"] = "no λ > 0 in the sweep"
    else:
        other = [k for k in sweep.group_keys if k != LAM]
        save("lambda_sensitivity", plots.lambda_sensitivity(sweep.summary, sweep.trials, other, f"λ sensitivity: {sweep.name}"))

    finished = [t for t in sweep.trials if t.get("status") == "TERMINATED" and not math.isnan(plots._num(t.get("test_auc")))]
    if len(finished) < 2:
        rep.skipped["entropy_vs_auc"] = "fewer than two finished trials"
    else:
        fig, rep.pearson_r, _ = plots.entropy_vs_auc(finished, f"Attention entropy vs test AUC: {sweep.name}")
        save("entropy_vs_auc", fig)

    runs = [(t, sweep.results[str(t["trial"])].get("history") or []) for t in sweep.trials if str(t["trial"]) in sweep.results]
    runs = [(t, h) for t, h in runs if h]
    if not runs:
        rep.skipped["training_curves"] = "no trial has a results.json with a history"
    else:
        other = [k for k in sweep.group_keys if k != LAM]
        save("training_curves", plots.training_curves(runs, f"Training curves: {sweep.name}", other_keys=other))

    root = data or (sweep.config.get("data") or {}).get("root")
    if root:  # Figs. 9 and 11 predict with the trials' checkpoints: only on the data they were trained on
        check_trained_on(read_record(url, options), root, storage.redact(url, options), options)
    cache: dict = {}  # one prediction per trial, shared by Fig. 9 and Fig. 11
    curves, grid, why = concentration_curves(sweep, data=data, split=split, options=options, progress=progress, cache=cache)
    if why:
        rep.skipped["attention_concentration"] = why
    else:
        save("attention_concentration", plots.concentration(curves, grid, f"Attention concentration on the {split} set: {sweep.name}"))
        storage.atomic_write_text(storage.join(plot_dir, "attention_concentration.csv"), _concentration_csv(curves, grid), options)

    maps, class_names, why = embedding_maps(sweep, data=data, split=split, options=options, progress=progress, cache=cache)
    if why:
        rep.skipped["embedding_umap"] = why
    else:
        from .embeddings import map_csv

        rep.v_measures = {label: m.v_measure for label, m in maps}
        save("embedding_umap", plots.embedding_maps(maps, class_names, f"UMAP of {split}-bag embeddings: {sweep.name}"))
        storage.atomic_write_text(storage.join(plot_dir, "embedding_umap.csv"), map_csv(maps), options)

    storage.atomic_write_text(rep.url, render_markdown(sweep, rep, options), options)
    return rep
