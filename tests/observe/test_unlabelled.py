"""Inference on new slides: `ingest --no-labels` makes an unlabelled dataset; `predict` on it writes
predictions.csv (no labels) and prints no metrics; training on it is refused in one line."""

from __future__ import annotations

import csv
import subprocess
import sys

import h5py
import numpy as np
import pytest

from aem_dist.data.ingest import ingest
from aem_dist.data.loader import read_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.schema import UNLABELLED
from aem_dist.data.sources import SourceError
from aem_dist.observe.attention import load_run_model, predict_split


def _h5_folder(demo_data: str, folder) -> dict:
    """The demo test split's slides as a TRIDENT folder of <slide>.h5 (features, coords), without labels."""
    m = load_manifest(demo_data)
    folder.mkdir()
    bags = {b.slide_id: b for b in read_split(demo_data, m, "test")}
    for sid, b in bags.items():
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["features"] = b.feats[None]  # TRIDENT's leading axis
            f["coords"] = b.coords
    return bags


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300)


def test_unlabelled_ingest_then_predict_writes_predictions_and_no_metrics(tiny_sweep, tmp_path):
    bags = _h5_folder(tiny_sweep.data, tmp_path / "h5")
    out = tmp_path / "new-slides"
    proc = _cli("ingest", "--format", "trident", "--src", str(tmp_path / "h5"), "--out", str(out), "--no-labels")
    assert proc.returncode == 0, proc.stderr
    assert "(no labels)" in proc.stdout and f"test: {len(bags)} bags" in proc.stdout
    m = load_manifest(str(out))
    assert list(m.splits) == ["test"] and m.class_names == [] and m.n_unlabelled("test") == len(bags)
    assert {b.label for b in m.splits["test"].bags()} == {UNLABELLED} and m.source["unlabelled"] is True
    assert _cli("verify", str(out)).returncode == 0  # an unlabelled dataset is a valid dataset

    trial = next(iter(tiny_sweep.trials.values()))["path"]
    proc = _cli("predict", "--run", trial, "--data", str(out), "--out", str(tmp_path / "pred" / "att.zarr"))
    assert proc.returncode == 0, proc.stderr
    assert "accuracy" not in proc.stdout and "auc" not in proc.stdout.lower()  # nothing to score
    with open(tmp_path / "pred" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    model = load_run_model(trial)
    names = model.meta["class_names"]
    assert {r["slide_id"] for r in rows} == set(bags) and all(r["label"] == "" for r in rows)
    # the same slides, labelled, predicted by the same model: the same probabilities
    labelled = {b.slide_id: b for b in predict_split(model, tiny_sweep.data, "test", progress=False)}
    for r in rows:
        want = labelled[r["slide_id"]].probs
        np.testing.assert_allclose([float(r[f"p_{c}"]) for c in names], want, atol=1e-6)
        assert r["predicted"] == names[int(np.argmax(want))]


def test_unlabelled_dataset_is_refused_for_training_and_folds(tmp_path, demo_data):
    from aem_dist.config import load_config
    from aem_dist.data.folds import make_folds
    from aem_dist.engine.loop import fit

    _h5_folder(demo_data, tmp_path / "h5")
    out = str(tmp_path / "new")
    ingest("trident", str(tmp_path / "h5"), out, no_labels=True, classes=["normal", "tumour"], progress=False)
    m = load_manifest(out)
    assert m.class_names == ["normal", "tumour"] and m.splits["test"].class_counts == [0, 0]  # --classes: names only, no counts
    cfg = load_config("demo", [f"data.root={out}", "train.epochs=1", "train.progress=false"])
    with pytest.raises(ValueError, match=r"split 'test' holds \d+ bag\(s\) without a label \(ingest --no-labels\): training needs labels"):
        fit(cfg)
    with pytest.raises(ValueError, match="have no label"):
        make_folds(m, 2)
    with pytest.raises(SourceError, match="--no-labels .* takes no --labels"):
        ingest("trident", str(tmp_path / "h5"), str(tmp_path / "x"), no_labels=True, labels_csv=str(tmp_path / "labels.csv"), progress=False)
