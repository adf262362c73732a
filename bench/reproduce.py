"""`make reproduce`: the paper's CAMELYON16 protocol on the synthetic `wsi-c16` preset, end to end
through the project's own commands, timed, written up as docs/reproduction.md with its figures.

    PYTHONPATH=$PWD python bench/reproduce.py                     # the committed run (~30 min on 2 cores)
    PYTHONPATH=$PWD python bench/reproduce.py --smoke             # a few minutes into repro-smoke/: checks the pipeline, not the numbers
    PYTHONPATH=$PWD python bench/reproduce.py --resume            # continue a stopped run (finished steps are kept)
    PYTHONPATH=$PWD python bench/reproduce.py --doc-only          # rebuild docs/reproduction.md from repro-out/ (trains nothing)

Steps, each `python -m aem_dist ...` in its own process (logs under OUT/logs/):

1. ``aem-dist synth --preset wsi-c16 --size-scale S`` — every bag of the preset (243 train, 27 val, 130
   test, D = 384, 2 classes), bag sizes multiplied by S so a CPU can train it (the only data change).
2. ``aem-dist sweep`` of ``configs/reproduce-c16.yaml`` — seeds × the paper's λ grid (Fig. 5, Table 2's
   ABMIL vs AEM), fused into populations; the sweep writes summary.md and report.md (the same
   ``write_report`` as ``aem-dist report``: Figs. 3, 5, 8, 9, 11).
3. the same with ``loss.kind=kl_uniform`` — the KL-to-uniform ablation (Fig. 7).
4. ``data.subsample_ratio`` × {λ = 0, λ*} × seeds, λ* = the λ > 0 the λ sweep chose on validation —
   Subsampling with and without AEM (Fig. 4a, Table 4).
5. docs/reproduction.md: command, date, machine, load, wall times (and any failed step, retried once
   with --resume), the tables, the figures (copied
   next to the doc), the paper's numbers side by side. The "reading" section is left as a marked
   placeholder: it is written by a person after reading the numbers (a rerun resets it).

Metrics serving is off (``metrics.enabled: false``) and every sweep's private Ray is shut down by the
command itself, so nothing is left running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from aem_dist.observe.tables import read_csv  # noqa: E402

CONFIG = "configs/reproduce-c16.yaml"
SEEDS = [0, 1, 2, 3, 4]
LAMS = [0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5]  # configs/camelyon16.yaml: the paper's CAMELYON16 grid
KL_LAMS = [0.005, 0.5]  # the paper's CAMELYON16 λ and the grid's largest
RATIOS = [0.2, 0.5]
FIGURES = {  # (sweep, plot) → file name next to the doc
    ("lambda", "lambda_sensitivity"): "lambda_sensitivity.png",
    ("lambda", "attention_concentration"): "attention_concentration.png",
    ("lambda", "entropy_vs_auc"): "entropy_vs_auc.png",
    ("lambda", "embedding_umap"): "embedding_umap.png",
    ("kl", "lambda_sensitivity"): "kl_lambda_sensitivity.png",
    ("subsample", "lambda_sensitivity"): "subsample_lambda_sensitivity.png",
}
# Why the scale and the learning rate differ from the paper: measured before the committed run
# (2026-11-30, this 2-core VM at load 11–25), single λ = 0 runs of
# `OMP_NUM_THREADS=1 aem-dist train --config configs/reproduce-c16.yaml --set loss.lam=0 --set train.lr=LR --set train.epochs=E`
# on `synth --preset wsi-c16 --size-scale 0.0625`; best val AUC / test AUC over the epochs as logged.
CALIBRATION = (
    "Why this scale and learning rate (measured on this machine before the run, single λ = 0 runs on the same data, "
    "`aem-dist train --config configs/reproduce-c16.yaml --set loss.lam=0 --set train.lr=LR`): one member-epoch took ~12 s single-threaded at load ~20 "
    "(bags ÷ 8: ~15 s in a 3-member population at load ~12), so 35 λ points plus the ablations allow only a few epochs of ÷ 16 bags in the hour. "
    "Per epoch, the paper's lr 1e-4 (2 epochs) and 1e-3 (6 epochs) stayed at chance (val AUC 0.52–0.59, test AUC 0.41–0.44, attention uniform); "
    "3e-3 (configs/demo.yaml's) gave val AUC 0.67–0.74 over 6 epochs (test AUC 0.46–0.47; every bag still predicted `normal`, F1 0.37); "
    "1e-2 was unstable (val AUC 0.42–0.75) and concentrated attention (test attention entropy 2.4 nats vs 6.19 at 1e-3). "
    "Hence 6 epochs at 3e-3."
)
READING_PLACEHOLDER = "_Not written yet: this section is written by a person after reading this run's numbers._"

# The paper's CAMELYON16 numbers (docs/models.md, "The paper's reported numbers"): mean ± sd over 5 runs.
PAPER = {
    "table2": [  # encoder, method, F1, AUC
        ("SSL ViT-S (Lunit)", "ABMIL", "0.914 ± 0.031", "0.945 ± 0.027"),
        ("SSL ViT-S (Lunit)", "AEM", "0.951 ± 0.004", "0.967 ± 0.008"),
        ("VLP ViT-L (PathGen-CLIP)", "ABMIL", "0.953 ± 0.018", "0.972 ± 0.010"),
        ("VLP ViT-L (PathGen-CLIP)", "AEM", "0.967 ± 0.025", "0.987 ± 0.013"),
        ("ImageNet ResNet18", "ABMIL", "0.759 ± 0.012", "0.797 ± 0.026"),
        ("ImageNet ResNet18", "AEM", "0.769 ± 0.018", "0.804 ± 0.027"),
    ],
    "table4": [  # encoder, method, F1, AUC
        ("SSL ViT-S (Lunit)", "Subsampling", "0.930 ± 0.012", "0.980 ± 0.010"),
        ("SSL ViT-S (Lunit)", "Subsampling + AEM", "0.950 ± 0.008", "0.980 ± 0.010"),
        ("VLP ViT-L (PathGen-CLIP)", "Subsampling", "0.948 ± 0.025", "0.982 ± 0.013"),
        ("VLP ViT-L (PathGen-CLIP)", "Subsampling + AEM", "0.956 ± 0.019", "0.989 ± 0.006"),
    ],
}


# --- running ---------------------------------------------------------------------------------------


class LoadSampler:
    """1-minute load average every ``every`` seconds in a background thread (the machine is shared)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self.every):
                return

    def __enter__(self) -> "LoadSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def aem(args: Sequence[str], log: Path) -> float:
    """Run ``aem-dist ARGS`` in its own process (as a user would), output to ``log``; its wall time."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ aem-dist {' '.join(args)}   (log: {log})", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "aem_dist", *args], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(f"  failed after {wall:.0f} s (exit {proc.returncode}); see {log}", flush=True)
        raise StepFailed(f"aem-dist {args[0]} failed after {wall:.0f} s (exit {proc.returncode}); see {log}", wall)
    print(f"  done in {wall:.0f} s", flush=True)
    return wall


def sweep_args(out: Path, data: Path, grid: dict[str, list[Any]], *sets: str, config: str = CONFIG) -> list[str]:
    grid_text = "{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in grid.items()) + "}"
    args = ["sweep", "--config", config, "--out", str(out), "--set", f"data.root={data}", "--set", f"sweep.grid={grid_text}"]
    for s in sets:
        args += ["--set", s]
    return args


def pop_cap(n_points: int, most: int = 7) -> int:
    """Members per population: an even number of populations (two cores, two trials at a time) of at most
    ``most`` members — on a CPU a member-step gets slower as a population grows (BENCHMARKS.md,
    "Populations"), so small populations only save the per-trial start-up."""
    n_trials = 2 * math.ceil(n_points / (2 * most))
    return max(1, math.ceil(n_points / n_trials))


# --- reading results -------------------------------------------------------------------------------


def num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def pm(values: Sequence[float], digits: int = 3) -> str:
    m, s, n = mean_std(values)
    return "–" if n == 0 else f"{m:.{digits}f} ± {s:.{digits}f}"


def paired_p(a: dict[Any, float], b: dict[Any, float]) -> tuple[float, int]:
    """Paired t-test (scipy.stats.ttest_rel) over the keys (seeds) both have; (p, pairs). NaN with < 2
    pairs; 1.0 when every difference is 0 (scipy would give NaN)."""
    keys = sorted(k for k in set(a) & set(b) if not math.isnan(a[k]) and not math.isnan(b[k]))
    if len(keys) < 2:
        return math.nan, len(keys)
    x, y = np.array([a[k] for k in keys]), np.array([b[k] for k in keys])
    d = x - y
    if np.all(d == d[0]):
        return (1.0 if d[0] == 0 else 0.0), len(keys)
    return float(stats.ttest_rel(x, y).pvalue), len(keys)


def fmt_p(p: float) -> str:
    return "–" if math.isnan(p) else f"{p:.3g}"


def by_seed(trials: Sequence[dict[str, Any]], col: str, **match: Any) -> dict[int, float]:
    """{seed: value of col} over finished trials whose swept values equal ``match`` (dotted keys with
    '.' written as '__')."""
    out = {}
    for t in trials:
        if t.get("status") != "TERMINATED":
            continue
        if all(math.isclose(num(t.get(k.replace("__", "."))), float(v)) if isinstance(v, (int, float)) else t.get(k.replace("__", ".")) == v for k, v in match.items()):
            out[int(t["train.seed"])] = num(t.get(col))
    return out


def chosen_lam(summary: Sequence[dict[str, Any]]) -> tuple[float, float]:
    """(λ chosen by validation, best λ > 0 by validation) from a λ sweep's summary.csv rows."""
    chosen = [r for r in summary if str(r.get("chosen")) == "True"]
    lam = num(chosen[0]["loss.lam"]) if chosen else math.nan
    pos = [r for r in summary if num(r.get("loss.lam")) > 0 and not math.isnan(num(r.get("val_score_mean")))]
    best_pos = num(max(pos, key=lambda r: num(r["val_score_mean"]))["loss.lam"]) if pos else math.nan
    return lam, best_pos


def concentration_points(csv_path: Path, fractions: Sequence[float]) -> list[tuple[str, list[tuple[float, float]]]]:
    """From attention_concentration.csv: per curve label, (mean, std) of the attention share held by the
    top ``fractions`` of instances (linear interpolation on the curve's grid)."""
    if not csv_path.exists():
        return []
    rows = read_csv(str(csv_path))
    grid = np.array([num(r["top_fraction"]) for r in rows])
    labels = [c[: -len(" mean")] for c in rows[0] if c.endswith(" mean")]
    out = []
    for label in labels:
        mean = np.array([num(r[f"{label} mean"]) for r in rows])
        std = np.array([num(r[f"{label} std"]) for r in rows])
        out.append((label, [(float(np.interp(f, grid, mean)), float(np.interp(f, grid, std))) for f in fractions]))
    return out


# --- the document ----------------------------------------------------------------------------------


def table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def lam_table(trials: Sequence[dict[str, Any]], summary: Sequence[dict[str, Any]], lams: Sequence[float], extra: dict[str, Any] | None = None) -> str:
    """Per λ: test AUC/F1 and val AUC/F1 mean ± std over seeds, attention, p vs λ = 0 (paired over
    seeds and the summary's unpaired), chosen."""
    extra = extra or {}
    rows = []
    base_auc, base_f1 = by_seed(trials, "test_auc", loss__lam=0.0, **extra), by_seed(trials, "test_f1", loss__lam=0.0, **extra)
    for lam in lams:
        sel = dict(loss__lam=lam, **extra)
        auc, f1 = by_seed(trials, "test_auc", **sel), by_seed(trials, "test_f1", **sel)
        srow = next((r for r in summary if math.isclose(num(r.get("loss.lam")), lam) and all(r.get(k.replace("__", ".")) == v for k, v in extra.items())), {})
        p_auc, n_pairs = paired_p(auc, base_auc) if lam != 0 else (math.nan, 0)
        p_f1, _ = paired_p(f1, base_f1) if lam != 0 else (math.nan, 0)
        rows.append([
            f"{lam:g}", str(len(auc)), pm(list(auc.values())), pm(list(f1.values())),
            pm(list(by_seed(trials, "val_auc", **sel).values())), pm(list(by_seed(trials, "val_f1", **sel).values())),
            pm(list(by_seed(trials, "test_attn_entropy", **sel).values()), 2), pm(list(by_seed(trials, "test_attn_entropy_norm", **sel).values())),
            pm(list(by_seed(trials, "test_attn_top1pct", **sel).values())),
            fmt_p(p_auc), fmt_p(p_f1), fmt_p(num(srow.get("p_test_auc_vs_lam0"))),
            "**yes**" if str(srow.get("chosen")) == "True" else "",
        ])
    head = ["λ", "seeds", "test AUC", "test F1", "val AUC", "val F1", "test attn entropy (nats)", "entropy / log N", "top-1 % share",
            "p(AUC) paired", "p(F1) paired", "p(AUC) unpaired", "chosen by val"]
    return table(head, rows)


def resume_command(command: str) -> str:
    """The command that continues a stopped run started with ``command``."""
    if command.startswith("make reproduce"):
        return "make reproduce REPRO_ARGS=--resume"
    return f"{command} --resume"


def build_markdown(ctx: dict[str, Any]) -> str:
    """docs/reproduction.md from what the run measured (``ctx``, see :func:`main`); every number in it
    comes from the run's own files."""
    lam_trials, lam_summary = ctx["lambda"]["trials"], ctx["lambda"]["summary"]
    kl_trials, kl_summary = ctx["kl"]["trials"], ctx["kl"]["summary"]
    sub_trials = ctx["subsample"]["trials"]
    lams, kl_lams, ratios, lam_star = ctx["lams"], ctx["kl_lams"], ctx["ratios"], ctx["lam_star"]
    m, spec = ctx["machine"], ctx["spec"]
    load = ctx["load"]
    lines = [
        "# Reproduction: the paper's CAMELYON16 protocol on synthetic `wsi-c16` data",
        "",
        f"Generated by `{ctx['command']}` (`bench/reproduce.py`) on {ctx['date']}. Everything below is measured by that run; "
        "the last section is a person's reading of these numbers. **The data are synthetic**: nothing here is a result on CAMELYON16.",
        "",
        "## Run",
        "",
        table(["", ""], [
            ["command", f"`{ctx['command']}`" + (f", stopped by the failure below and continued by `{resume_command(ctx['command'])}`" if ctx["n_sessions"] > 1 else "")],
            ["date (UTC)", f"{ctx['date']} → {ctx['end']}"],
            ["wall time", f"**{ctx['wall_s'] / 60:.1f} min** ({ctx['wall_s']:.0f} s" + (f", {ctx['n_sessions']} sessions" if ctx["n_sessions"] > 1 else "") + "): "
             + ", ".join(f"{k} {v:.0f} s" for k, v in ctx["steps"].items())
             + "".join(f"; **failed**: {f['step']} after {f['after_s']:.0f} s (`{f['why']}`), then rerun with `--resume`" for f in ctx["failed"])],
            ["machine", f"{m['cpus']} CPUs ({m['cpu_model']}), {m['ram_gib']:.0f} GiB RAM, no GPU; {m['os']}"],
            ["load (1-min average, sampled every 15 s)", f"mean {load['mean']:.1f}, max {load['max']:.1f} over {load['n']} samples{load['note']} — the machine was shared with other engineers' jobs"],
            ["software", f"aem-dist {m['aem_dist']} (commit {m['commit']}), Python {m['python']}, torch {m['torch']}, Ray {m['ray']}, numpy {m['numpy']}, scikit-learn {m['sklearn']}"],
        ]),
        "",
        "## Protocol: the paper's vs this run",
        "",
        table(["", "paper (CAMELYON16)", "this run"], [
            ["data", "400 WSIs: 270 official train split 9:1 into train/val, 130 test; patch features of a frozen encoder",
             f"`aem-dist synth --preset wsi-c16 --size-scale {ctx['size_scale']:g} --seed 0`: {spec['bags']} bags (train / val / test), "
             f"D = {spec['dim']}, {spec['instances']} instances (median bag {spec['median']:,}; the preset's is 8 000)"],
            ["model", "ABMIL, gated attention, hidden 128", "`abmil`, hidden 128, no bias (the official code's)"],
            ["optimisation", "50 epochs, Adam(W) lr 1e-4 cosine, weight decay 1e-4, batch 1 bag",
             f"**{ctx['epochs']} epoch{'s' if ctx['epochs'] != 1 else ''}**, AdamW **lr {ctx['lr']:g}** per-iteration cosine to 0, weight decay {ctx['wd']:g}, batch 1 bag"],
            ["seeds", "5 runs, random parameter initialisations", f"{len(ctx['seeds'])} seeds ({', '.join(map(str, ctx['seeds']))}): initialisation only (`train.data_seed: 0`, one data order)"],
            ["λ grid", "7 values incl. 0 (Fig. 5); λ = 0.005 chosen", ", ".join(f"{x:g}" for x in lams)],
            ["selection", "test metrics at the best validation epoch", "the same: best val AUC + F1 (ties by val loss); λ chosen by mean val AUC + F1"],
            ["KL ablation", "ABMIL vs + negative entropy vs + KL to uniform (Fig. 7)", f"`loss.kind=kl_uniform` at λ ∈ {{{', '.join(f'{x:g}' for x in kl_lams)}}}"],
            ["Subsampling", "ratios explored, chosen on validation; ± AEM (Table 4)", f"`data.subsample_ratio` ∈ {{{', '.join(f'{r:g}' for r in ratios)}}} × λ ∈ {{0, {lam_star:g}}}"],
        ]),
        "",
        CALIBRATION,
        "",
        f"Trials: {ctx['n_points']} grid points in {ctx['n_trials']} Ray Tune trials (populations: grid points that differ only in "
        "λ, seed or `loss.kind` train fused, each exactly its standalone run; docs/ARCHITECTURE.md).",
        "",
        "## λ sweep (Fig. 5; Table 2's ABMIL vs AEM)",
        "",
        "Mean ± sample std over seeds. p paired: paired t-test vs λ = 0 over seeds (each seed's λ runs share initialisation and data order); "
        "p unpaired: the sweep summary's two-sample t-test. Attention columns: test bags, at the selected epoch.",
        "",
        lam_table(lam_trials, lam_summary, lams),
        "",
        f"Chosen by validation: **λ = {ctx['lam_chosen']:g}**" + (f" (λ = 0 won validation; the best λ > 0 by validation, used below, is {lam_star:g})" if ctx["lam_chosen"] == 0 else "") + ".",
        "",
        "![λ sensitivity](reproduction/lambda_sensitivity.png)",
        "",
    ]
    conc = ctx["concentration"]
    if conc:
        fr = ctx["conc_fractions"]
        lines += [
            "### Attention concentration (Fig. 9) and entropy (Fig. 3)",
            "",
            "Share of each test bag's attention held by its top-ranked instances (mean over bags, then mean ± std over seeds):",
            "",
            table(["curve", *[f"top {f * 100:g} %" for f in fr]], [[label, *[f"{mv:.3f} ± {sv:.3f}" for mv, sv in pts]] for label, pts in conc]),
            "",
            f"Pearson r between a trial's mean test attention entropy and its test AUC over all {len(lam_trials)} λ-sweep trials: "
            f"**{ctx['pearson_r']:.3f}**." if not math.isnan(ctx["pearson_r"]) else "",
            "",
            "![attention concentration](reproduction/attention_concentration.png)",
            "",
            "![entropy vs AUC](reproduction/entropy_vs_auc.png)",
            "",
        ]
    if ctx.get("v_measures"):
        lines += ["### Bag embeddings (Fig. 11)", "", "k-means V-measure of the test-bag embeddings (one model each): "
                  + "; ".join(f"{k}: {v:.3f}" for k, v in ctx["v_measures"].items()) + ".", "", "![UMAP](reproduction/embedding_umap.png)", ""]
    lines += ["Training curves (Fig. 8) are in the λ sweep's own report (`OUT/lambda/report.md`; not copied here: the figure of 35 runs is ~0.4 MB).", ""]

    # KL vs entropy
    rows = []
    for lam in kl_lams:
        ne_auc, kl_auc = by_seed(lam_trials, "test_auc", loss__lam=lam), by_seed(kl_trials, "test_auc", loss__lam=lam)
        ne_f1, kl_f1 = by_seed(lam_trials, "test_f1", loss__lam=lam), by_seed(kl_trials, "test_f1", loss__lam=lam)
        diffs = [abs(kl_auc[s] - ne_auc[s]) for s in set(kl_auc) & set(ne_auc)]
        p, _ = paired_p(kl_auc, ne_auc)
        p0, _ = paired_p(kl_auc, by_seed(lam_trials, "test_auc", loss__lam=0.0))
        rows.append([f"{lam:g}", pm(list(ne_auc.values())), pm(list(kl_auc.values())), pm(list(ne_f1.values())), pm(list(kl_f1.values())),
                     f"{max(diffs):.2g}" if diffs else "–", fmt_p(p), fmt_p(p0)])
    base = by_seed(lam_trials, "test_auc", loss__lam=0.0)
    kl_chosen, _ = chosen_lam(kl_summary)
    lines += [
        "## KL-to-uniform ablation (Fig. 7)",
        "",
        f"λ = 0 (ABMIL): test AUC {pm(list(base.values()))}, F1 {pm(list(by_seed(lam_trials, 'test_f1', loss__lam=0.0).values()))}. "
        f"KL's λ chosen by validation among its λ values: {kl_chosen:g}.",
        "",
        table(["λ", "test AUC, entropy", "test AUC, KL", "test F1, entropy", "test F1, KL", "max abs(ΔAUC) over seeds", "p(AUC) KL vs entropy, paired", "p(AUC) KL vs λ = 0, paired"], rows),
        "",
        "`loss.kind=kl_uniform` is KL(u ‖ a) = −log N − (1/N) Σ log a_i per bag (aem_dist/losses.py), C2C's KL loss: it pulls up every "
        "small weight, where the negative entropy punishes peaks.",
        "",
        "![KL λ sensitivity](reproduction/kl_lambda_sensitivity.png)",
        "",
    ]

    # Subsampling
    rows = []
    for r in ratios:
        cells = [f"{r:g}"]
        for lam in (0.0, lam_star):
            sel = dict(data__subsample_ratio=r, loss__lam=lam)
            cells += [pm(list(by_seed(sub_trials, "test_auc", **sel).values())), pm(list(by_seed(sub_trials, "test_f1", **sel).values())),
                      pm(list(by_seed(sub_trials, "val_auc", **sel).values()))]
        p, _ = paired_p(by_seed(sub_trials, "test_auc", data__subsample_ratio=r, loss__lam=lam_star), by_seed(sub_trials, "test_auc", data__subsample_ratio=r, loss__lam=0.0))
        cells.append(fmt_p(p))
        rows.append(cells)
    full = [["1 (off)", pm(list(base.values())), pm(list(by_seed(lam_trials, "test_f1", loss__lam=0.0).values())), pm(list(by_seed(lam_trials, "val_auc", loss__lam=0.0).values())),
             pm(list(by_seed(lam_trials, "test_auc", loss__lam=lam_star).values())), pm(list(by_seed(lam_trials, "test_f1", loss__lam=lam_star).values())),
             pm(list(by_seed(lam_trials, "val_auc", loss__lam=lam_star).values())),
             fmt_p(paired_p(by_seed(lam_trials, "test_auc", loss__lam=lam_star), base)[0])]]
    sub_choice = ctx["subsample_choice"]
    lines += [
        "## Subsampling with and without AEM (Fig. 4a, Table 4)",
        "",
        f"λ* = {lam_star:g} (from the λ sweep's validation). The row `1 (off)` is the λ sweep's own trials.",
        "",
        table(["ratio", "λ = 0 test AUC", "λ = 0 test F1", "λ = 0 val AUC", f"λ = {lam_star:g} test AUC", f"λ = {lam_star:g} test F1", f"λ = {lam_star:g} val AUC", "p(AUC) λ* vs 0, paired"], full + rows),
        "",
        "Ratio chosen by mean val AUC + F1 (as the paper picks it): " + "; ".join(f"λ = {lam:g}: r = {r:g} → test AUC {a}, F1 {f}" for lam, (r, a, f) in sub_choice.items()) + ".",
        "",
        "![Subsampling λ sensitivity](reproduction/subsample_lambda_sensitivity.png)",
        "",
        "## The paper's numbers (CAMELYON16), side by side",
        "",
        "The paper's are real CAMELYON16 features of three encoders, 50 epochs; ours are synthetic bags. Only the direction and size of "
        "differences can be compared, not the levels.",
        "",
        table(["source", "method", "test F1", "test AUC"],
              [[f"paper, {e}", mth, f1, auc] for e, mth, f1, auc in PAPER["table2"]]
              + [["this run", "ABMIL (λ = 0)", pm(list(by_seed(lam_trials, "test_f1", loss__lam=0.0).values())), pm(list(base.values()))],
                 ["this run", f"AEM (λ = {ctx['lam_chosen']:g}, chosen)", pm(list(by_seed(lam_trials, "test_f1", loss__lam=ctx["lam_chosen"]).values())), pm(list(by_seed(lam_trials, "test_auc", loss__lam=ctx["lam_chosen"]).values()))],
                 ["this run", "AEM (λ = 0.005, the paper's)", pm(list(by_seed(lam_trials, "test_f1", loss__lam=0.005).values())), pm(list(by_seed(lam_trials, "test_auc", loss__lam=0.005).values()))]]
              + [[f"paper, {e}", mth, f1, auc] for e, mth, f1, auc in PAPER["table4"]]
              + [["this run", f"Subsampling (r = {sub_choice[0.0][0]:g}, chosen)", sub_choice[0.0][2], sub_choice[0.0][1]],
                 ["this run", f"Subsampling + AEM (r = {sub_choice[lam_star][0]:g}, λ = {lam_star:g})", sub_choice[lam_star][2], sub_choice[lam_star][1]]]),
        "",
        "The paper's Fig. 7 (KL) and Fig. 5 (λ) give no numbers in the text: KL \"degrad[es] on CAMELYON datasets\", negative entropy improves on "
        "the baseline everywhere; λ = 0.005 is CAMELYON16's choice.",
        "",
        "## Reading",
        "",
        READING_PLACEHOLDER,
        "",
        "## Files",
        "",
        "Each sweep's `trials.csv` is copied to `docs/reproduction/` (one row per grid point: swept values, best epoch, val/test metrics, "
        "attention statistics). The full outputs (summary.md, report.md, checkpoints) are under the run's `--out` folder, not committed.",
        "",
    ]
    return "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import ray
    import sklearn
    import torch

    import aem_dist

    cpu_model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    mem_kb = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "ram_gib": mem_kb / 2**20, "os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__,
            "sklearn": sklearn.__version__, "aem_dist": aem_dist.__version__, "commit": commit}


def load_sweep(out: Path) -> dict[str, Any]:
    return {"trials": read_csv(str(out / "trials.csv")), "summary": read_csv(str(out / "summary.csv"))}


def ratio_choice(trials: Sequence[dict[str, Any]], ratios: Sequence[float], lam: float) -> tuple[float, str, str]:
    """(ratio with the best mean val AUC + F1 at λ, its test AUC, its test F1)."""
    def score(r: float) -> float:
        sel = dict(data__subsample_ratio=r, loss__lam=lam)
        return mean_std(list(by_seed(trials, "val_auc", **sel).values()))[0] + mean_std(list(by_seed(trials, "val_f1", **sel).values()))[0]

    scored = [r for r in ratios if not math.isnan(score(r))]
    if not scored:
        return math.nan, "–", "–"
    best = max(scored, key=score)
    sel = dict(data__subsample_ratio=best, loss__lam=lam)
    return best, pm(list(by_seed(trials, "test_auc", **sel).values())), pm(list(by_seed(trials, "test_f1", **sel).values()))


class StepFailed(RuntimeError):
    def __init__(self, message: str, wall_s: float):
        super().__init__(message)
        self.wall_s = wall_s


def run_steps(a: argparse.Namespace, out: Path, data: Path, logs: Path, run_file: Path, command: str, kl_lams: list[float], seeds: list[int], epochs_set: list[str]) -> dict[str, Any]:
    """Run the steps not yet finished (all of them unless --resume finds a previous session's record),
    saving the record after each. A failed step (e.g. Ray start-up timing out on a loaded machine) is
    recorded and retried once, a sweep with --resume; the document reports both."""
    run = json.loads(run_file.read_text()) if a.resume and run_file.exists() else None
    if run is None:
        m = machine()  # the code that ran: recorded before the run, so a later --doc-only keeps it
        run = {"command": command, "started": datetime.now(timezone.utc).isoformat(), "sessions": [], "steps": {}, "failed": [], "load": [],
               "machine": m, "seeds": seeds, "lams": a.lams, "kl_lams": kl_lams, "ratios": a.ratios, "size_scale": a.size_scale, "scale": a.scale, "epochs_set": epochs_set}
    seeds, lams, kl_lams, ratios, epochs_set = run["seeds"], run["lams"], run["kl_lams"], run["ratios"], run["epochs_set"]
    session = {"started": datetime.now(timezone.utc).isoformat(), "resumed": bool(run["sessions"])}
    run["sessions"].append(session)
    t0 = time.perf_counter()
    print(f"reproduce: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, commit {run['machine']['commit']}; output {out}", flush=True)

    def save() -> None:
        session["ended"], session["wall_s"] = datetime.now(timezone.utc).isoformat(), time.perf_counter() - t0
        run["wall_s"] = sum(x.get("wall_s", 0.0) for x in run["sessions"])
        run["load"] = run["load"][: run.get("_load_kept", len(run["load"]))] + sampler.samples
        tmp = run_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in run.items() if k != "_load_kept"}, indent=1))
        tmp.replace(run_file)

    def step(name: str, args: list[str], log: Path, is_sweep: bool = True) -> None:
        if name in run["steps"]:
            print(f"{name}: finished in an earlier session ({run['steps'][name]:.0f} s)", flush=True)
            return
        for attempt in (1, 2):
            retry = attempt == 2 or any(f["step"] == name for f in run["failed"])
            try:
                run["steps"][name] = aem(args + (["--resume"] if retry and is_sweep else []), log.with_suffix(f".{attempt}.log") if retry else log)
                break
            except StepFailed as err:
                run["failed"].append({"step": name, "after_s": round(err.wall_s, 1), "why": tail_error(log.with_suffix(f".{attempt}.log") if retry else log)})
                save()
                if attempt == 2:
                    raise SystemExit(f"{name} failed twice; rerun with --resume to continue ({err})")
        save()

    run["_load_kept"] = len(run["load"])
    with LoadSampler() as sampler:
        if not (data / "manifest.json").exists():
            step("synth", ["synth", "--preset", "wsi-c16", "--seed", "0", "--scale", f"{run['scale']:g}", "--size-scale", f"{run['size_scale']:g}", "--out", str(data)], logs / "synth.log", is_sweep=False)
        step("λ sweep", sweep_args(out / "lambda", data, {"train.seed": seeds, "loss.lam": lams}, f"sweep.population={pop_cap(len(seeds) * len(lams))}", *epochs_set), logs / "lambda.log")
        lam_chosen, best_pos = chosen_lam(load_sweep(out / "lambda")["summary"])
        run["lam_chosen"], run["lam_star"] = lam_chosen, lam_chosen if lam_chosen > 0 else best_pos
        step("KL sweep", sweep_args(out / "kl", data, {"train.seed": seeds, "loss.lam": kl_lams}, "loss.kind=kl_uniform", f"sweep.population={pop_cap(len(seeds) * len(kl_lams))}", *epochs_set), logs / "kl.log")
        cap = pop_cap(2 * len(seeds))  # grid points fuse only within a ratio (2 λ × seeds each)
        step("Subsampling sweep", sweep_args(out / "subsample", data, {"data.subsample_ratio": ratios, "loss.lam": [0.0, run["lam_star"]], "train.seed": seeds}, f"sweep.population={cap}", *epochs_set), logs / "subsample.log")
        save()
    run.pop("_load_kept", None)
    return run


def tail_error(log: Path) -> str:
    """The last line of a failed command's log that names an error (for the record)."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errs = [ln for ln in lines if "Error" in ln or "Exception" in ln or ln.startswith("error")]
    return (errs or lines or ["empty log"])[-1][:300]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="Folder for the data, the sweeps and their logs (default: repro-out, with --smoke repro-smoke).")
    ap.add_argument("--doc", default=None, help="The document to write; figures go to <doc without .md>/ (default: docs/reproduction.md, with --smoke OUT/reproduction.md).")
    ap.add_argument("--size-scale", type=float, default=0.0625, help="Bag-size scale of the wsi-c16 preset (synth --size-scale).")
    ap.add_argument("--scale", type=float, default=1.0, help="Bag-count scale of the preset (synth --scale).")
    ap.add_argument("--epochs", type=int, default=None, help="Override train.epochs of the config.")
    ap.add_argument("--seeds", type=int, default=len(SEEDS))
    ap.add_argument("--lams", type=float, nargs="+", default=LAMS)
    ap.add_argument("--kl-lams", type=float, nargs="+", default=None, help=f"λ values of the KL ablation (default: {KL_LAMS}).")
    ap.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    ap.add_argument("--resume", action="store_true", help="Continue the run recorded in --out/reproduce-run.json: finished steps are kept, the rest run (a sweep with --resume).")
    ap.add_argument("--doc-only", action="store_true", help="Rebuild the document from a finished run in --out (its reproduce-run.json); trains nothing.")
    ap.add_argument("--smoke", action="store_true", help="A few minutes: scale 0.25, size scale 0.05, 2 epochs, 2 seeds, λ ∈ {0, 0.005, 0.5}, ratio 0.5.")
    a = ap.parse_args()
    if a.smoke:  # never overwrites the committed docs/reproduction.md unless --doc says so
        a.scale, a.size_scale, a.epochs, a.seeds, a.lams, a.ratios = 0.25, 0.05, 2, 2, [0.0, 0.005, 0.5], [0.5]
    a.out = a.out or ("repro-smoke" if a.smoke else "repro-out")
    a.doc = a.doc or (f"{a.out}/reproduction.md" if a.smoke else "docs/reproduction.md")
    kl_lams = a.kl_lams or [x for x in KL_LAMS if x in a.lams] or [x for x in a.lams if x > 0][:1]
    seeds = list(range(a.seeds))
    out = (ROOT / a.out).resolve() if not os.path.isabs(a.out) else Path(a.out)
    doc = (ROOT / a.doc).resolve() if not os.path.isabs(a.doc) else Path(a.doc)
    fig_dir = doc.with_suffix("")
    data, logs = out / "data", out / "logs"
    args_text = " ".join(sys.argv[1:])
    if os.environ.get("AEM_REPRO_VIA_MAKE"):
        command = "make reproduce" + (f" REPRO_ARGS='{args_text}'" if args_text else "")
    else:
        command = f"python bench/reproduce.py {args_text}".strip()
    epochs_set = [f"train.epochs={a.epochs}"] if a.epochs else []

    run_file = out / "reproduce-run.json"  # what the sweeps measured, kept after every step (--resume, --doc-only)
    if a.doc_only:
        run = json.loads(run_file.read_text())
    else:
        run = run_steps(a, out, data, logs, run_file, command, kl_lams, seeds, epochs_set)
    started, ended = datetime.fromisoformat(run["started"]), datetime.fromisoformat(run["sessions"][-1]["ended"])
    seeds, kl_lams, lam_chosen, lam_star = run["seeds"], run["kl_lams"], run["lam_chosen"], run["lam_star"]
    a.lams, a.ratios, a.size_scale, command, m = run["lams"], run["ratios"], run["size_scale"], run["command"], run["machine"]

    manifest = json.loads((data / "manifest.json").read_text())
    src = manifest.get("source", {}).get("spec", {})
    splits = manifest["splits"]
    spec = {"bags": " / ".join(str(splits[s]["n_bags"]) for s in ("train", "val", "test")), "dim": manifest["dim"],
            "instances": " / ".join(f"{splits[s]['n_instances']:,}" for s in ("train", "val", "test")), "median": src.get("median_instances", 0)}
    kl_sweep, sub_sweep = load_sweep(out / "kl"), load_sweep(out / "subsample")
    runs = [json.loads((out / s / "run.json").read_text()) for s in ("lambda", "kl", "subsample")]
    cfg = runs[0]["config"]
    report_md = (out / "lambda" / "report.md").read_text()
    r_line = next((ln for ln in report_md.splitlines() if ln.startswith("Pearson r = ")), "")
    v_line = next((ln for ln in report_md.splitlines() if ln.startswith("V-measure: ")), "")
    v_measures = {}
    if v_line:
        for part in v_line[len("V-measure: "):].split(". Data:")[0].split("; "):
            label, _, value = part.rpartition(": ")
            v_measures[label] = float(value)
    fr = [0.01, 0.1]
    ctx = {
        "command": command, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "end": ended.strftime("%H:%M UTC"), "wall_s": run["wall_s"], "steps": run["steps"],
        "machine": m, "load": {"mean": float(np.mean(run["load"])), "max": float(np.max(run["load"])), "n": len(run["load"]), "note": f" ({run['load_note']})" if run.get("load_note") else ""},
        "failed": run.get("failed", []), "n_sessions": len(run.get("sessions", [])),
        "size_scale": a.size_scale, "spec": spec, "epochs": cfg["train"]["epochs"], "lr": cfg["train"]["lr"], "wd": cfg["train"]["weight_decay"], "seeds": seeds, "lams": a.lams, "kl_lams": kl_lams,
        "ratios": a.ratios, "lam_chosen": lam_chosen, "lam_star": lam_star,
        "lambda": load_sweep(out / "lambda"), "kl": kl_sweep, "subsample": sub_sweep,
        "n_points": sum(len(p) for r in runs for p in r.get("populations") or []),
        "n_trials": sum(len(r.get("populations") or []) for r in runs),
        "concentration": concentration_points(out / "lambda" / "plots" / "attention_concentration.csv", fr), "conc_fractions": fr,
        "pearson_r": float(r_line.split("=")[1].strip(" .")) if r_line else math.nan, "v_measures": v_measures,
        "subsample_choice": {lam: ratio_choice(sub_sweep["trials"], a.ratios, lam) for lam in (0.0, lam_star)},
    }
    fig_dir.mkdir(parents=True, exist_ok=True)
    for (sweep, plot), name in FIGURES.items():
        src_png = out / sweep / "plots" / f"{plot}.png"
        if src_png.exists():
            shutil.copyfile(src_png, fig_dir / name)
    for sweep in ("lambda", "kl", "subsample"):
        shutil.copyfile(out / sweep / "trials.csv", fig_dir / f"trials-{sweep}.csv")
    text = build_markdown(ctx)
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    print(f"wrote {doc} and {fig_dir}/; the run took {run['wall_s'] / 60:.1f} min (load mean {ctx['load']['mean']:.1f})", flush=True)


if __name__ == "__main__":
    main()
