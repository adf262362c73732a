"""`aem-dist report` on a tiny finished sweep (2 λ × 2 seeds, in-process training)."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aem_dist.observe import plots
from aem_dist.observe.attention import concentration_curve, concentration_grid
from aem_dist.observe.report import PLOTS, concentration_pairs, load_sweep, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_cli_writes_every_plot_and_the_markdown(tiny_sweep):
    root = Path(tiny_sweep.root)
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "report", str(root), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"with {len(PLOTS)} plots" in proc.stdout and "left out" not in proc.stdout

    pngs = sorted((root / "plots").glob("*.png"))
    assert [p.stem for p in pngs] == sorted(PLOTS)
    for p in pngs:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 20_000, (p.name, len(data))

    md = (root / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(embedded) == sorted(f"plots/{name}.png" for name in PLOTS)
    assert all((root / rel).exists() for rel in embedded)
    # the summary table (per λ, mean ± std, chosen λ) and every trial are in it
    assert "| loss.lam | seeds | test AUC | test F1 |" in md
    assert re.search(r"\| 0\.1 \| 2 \| \d\.\d{3} ± \d\.\d{3} \|", md)
    assert "**yes**" in md
    for name in tiny_sweep.trials:
        assert f"| {name} |" in md
    assert re.search(r"Pearson r = -?\d\.\d{3}", md)

    # the concentration curves behind Fig. 9 are saved and sane: from 0 towards 1, non-decreasing
    with open(root / "plots" / "attention_concentration.csv") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], np.array(rows[1:], dtype=float)
    assert header[0] == "top_fraction" and len(header) == 5  # two λ, mean and std each
    for col in (1, 3):
        assert np.all(np.diff(body[:, col]) >= -1e-9) and body[-1, col] == pytest.approx(1.0)

    # Fig. 11: the UMAP points and the V-measure of each panel, which is scikit-learn's on the same labels
    from sklearn.metrics import v_measure_score

    assert "## Bag embeddings (Fig. 11)" in md
    with open(root / "plots" / "embedding_umap.csv") as f:
        points = list(csv.DictReader(f))
    models = list(dict.fromkeys(p["model"] for p in points))
    assert len(models) == 2 and models[0].startswith("λ = 0")
    for model in models:
        mine = [p for p in points if p["model"] == model]
        v = v_measure_score([int(p["label"]) for p in mine], [int(p["cluster"]) for p in mine])
        assert f"{model}: {v:.3f}" in md


def test_concentration_compares_lambda0_with_the_chosen_lambda(tiny_sweep):
    sweep = load_sweep(tiny_sweep.root)
    pairs, why = concentration_pairs(sweep)
    assert why is None
    chosen = [r for r in sweep.summary if r.get("chosen")][0]
    lams = [{tiny_sweep.trials[n]["lam"] for n in names} for _, names in pairs]
    # λ = 0 (both seeds) against λ = 0.1: the chosen λ, or — if validation chose λ = 0 — the best λ > 0
    assert lams == [{0.0}, {0.1}] and all(len(names) == 2 for _, names in pairs)
    assert ("chosen by validation" in pairs[1][0]) == (chosen["loss.lam"] == 0.1)


def test_concentration_curve_math():
    grid = concentration_grid(50)
    uniform = concentration_curve(np.full(100, 0.01), grid)
    assert np.allclose(uniform, grid, atol=1e-9)  # uniform attention: the top f hold f
    peaked = concentration_curve(np.r_[0.9, np.full(99, 0.1 / 99)], grid)
    assert peaked[np.searchsorted(grid, 0.01)] == pytest.approx(0.9, abs=0.01)  # top 1 % (= 1 instance) holds 0.9
    assert np.all(peaked >= uniform - 1e-12)


def test_report_on_a_single_run_leaves_out_sweep_plots(tiny_sweep):
    run = tiny_sweep.trials["trial_0000"]["path"]
    rep = write_report(run)
    assert set(rep.plots) == {"training_curves", "attention_concentration", "embedding_umap"}  # Fig. 11 of the one model
    assert set(rep.skipped) == {"lambda_sensitivity", "entropy_vs_auc"}
    md = Path(run, "report.md").read_text()
    assert "## Plots left out" in md and "λ (loss.lam) is not swept" in md


def test_pearson_edge_cases():
    r, p = plots.pearson([1, 2, 3, 4], [2, 4, 6, 8.5])
    assert r > 0.99 and 0 <= p < 0.05
    assert np.isnan(plots.pearson([1, 2], [1, 2])[0])
    assert np.isnan(plots.pearson([1, 1, 1], [1, 2, 3])[0])


def test_report_names_a_missing_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "report", str(tmp_path / "nothing")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "neither a sweep (no trials.csv) nor a run (no results.json)" in proc.stderr and "nothing" in proc.stderr


@pytest.mark.integration
def test_report_on_s3(tiny_sweep, observe_s3):
    """The same report from a sweep stored on S3 (SeaweedFS), written back next to it on S3."""
    import s3fs

    from aem_dist import storage
    from aem_dist.observe.tables import read_csv, write_tables

    fs = s3fs.S3FileSystem(endpoint_url=observe_s3.endpoint, key=observe_s3.key, secret=observe_s3.secret, skip_instance_cache=True)
    url = f"s3://{observe_s3.bucket}/sweeps/tiny"
    for name in tiny_sweep.trials:
        local = Path(tiny_sweep.root, "trials", name)
        for rel in ("results.json", "run.json", "best/state.pt"):
            fs.put_file(str(local / rel), f"{observe_s3.bucket}/sweeps/tiny/trials/{name}/{rel}")
    fs.put_file(str(Path(tiny_sweep.root, "run.json")), f"{observe_s3.bucket}/sweeps/tiny/run.json")
    rows = read_csv(str(Path(tiny_sweep.root, "trials.csv")))
    for row in rows:
        row["path"] = storage.join(url, "trials", row["trial"])  # the trials' folders now live on S3
    write_tables(url, rows, ["loss.lam", "train.seed"])

    rep = write_report(url, data=tiny_sweep.data)
    assert set(rep.plots) == set(PLOTS) and not rep.skipped
    for name in PLOTS:
        data = fs.cat_file(f"{observe_s3.bucket}/sweeps/tiny/plots/{name}.png")
        assert data.startswith(PNG) and len(data) > 20_000
    md = fs.cat_file(f"{observe_s3.bucket}/sweeps/tiny/report.md").decode()
    assert "![λ sensitivity (Fig. 5)](plots/lambda_sensitivity.png)" in md and observe_s3.secret not in md


def test_fig11_v_measure_is_sklearns_on_the_models_embeddings(tiny_sweep):
    """The V-measure in Fig. 11 = sklearn's v_measure_score of the true classes against a k-means
    clustering of the pooled embeddings that `predict` returned for the same bags."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import v_measure_score

    from aem_dist.observe.report import embedding_maps

    sweep = load_sweep(tiny_sweep.root)
    cache: dict = {}
    maps, class_names, why = embedding_maps(sweep, data=tiny_sweep.data, cache=cache)
    assert why is None and len(maps) == 2 and class_names
    for (label, m), name in zip(maps, [n for n in cache]):
        run, bags = cache[name]
        emb = np.stack([b.embedding for b in bags])
        hidden = run.model.classifier.in_features  # abmil's z feeds its classifier
        assert emb.shape == (len(bags), hidden) and [b.key for b in bags] == m.keys
        labels = np.array([b.label for b in bags])
        clusters = KMeans(n_clusters=len(class_names), n_init=10, random_state=0).fit_predict(emb.astype(np.float64))
        assert m.v_measure == pytest.approx(v_measure_score(labels, clusters), abs=1e-12)
        assert m.xy.shape == (len(bags), 2) and np.isfinite(m.xy).all()


def test_v_measure_matches_sklearn():
    from sklearn.metrics import v_measure_score

    from aem_dist.observe.embeddings import v_measure

    assert v_measure(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0])) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    y, c = rng.integers(0, 3, 50), rng.integers(0, 2, 50)
    assert v_measure(y, c) == pytest.approx(v_measure_score(y, c), abs=1e-15)


def test_report_against_changed_data_is_refused(tiny_sweep, tmp_path):
    import json
    import shutil

    from aem_dist.observe.identity import DataChanged

    sweep = tmp_path / "sweep"
    shutil.copytree(tiny_sweep.root, sweep)
    record = json.loads((sweep / "run.json").read_text())
    record["datasets"] = {tiny_sweep.data: "f" * 64}  # as if trained on other data
    (sweep / "run.json").write_text(json.dumps(record))
    with pytest.raises(DataChanged, match="f{64}.*pass --data"):
        write_report(str(sweep), options=None)
