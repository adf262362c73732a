"""predict's predictions.csv and the ensemble of a sweep's chosen λ (mean of the members' probabilities)."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest

from aem_dist.observe.attention import AttentionStore, BagResult, load_run_model, predict_split
from aem_dist.observe.predictions import accuracy_line, ensemble, ensemble_members, predictions_csv


def _bag(key, label, probs):
    return BagResult(f"slide {key}", key, "test", label, np.array(probs, dtype=np.float32), np.array([0.25, 0.75], dtype=np.float32), np.zeros((2, 2), np.int32))


def test_predictions_csv_has_one_row_per_slide_and_no_labels_for_unlabelled():
    bags = [_bag("a", 1, [0.2, 0.8]), _bag("b", -1, [0.9, 0.1])]
    rows = list(csv.DictReader(predictions_csv(bags, ["normal", "tumour"], {"slide a": "patient-7"}).splitlines()))
    assert list(rows[0]) == ["slide_id", "case_id", "split", "label", "p_normal", "p_tumour", "predicted"]
    assert rows[0] == {"slide_id": "slide a", "case_id": "patient-7", "split": "test", "label": "tumour", "p_normal": "0.200000", "p_tumour": "0.800000", "predicted": "tumour"}
    assert rows[1]["label"] == "" and rows[1]["case_id"] == "" and rows[1]["predicted"] == "normal"
    assert accuracy_line(bags) == "accuracy 1.000 on 1 labelled slide" and accuracy_line(bags[1:]) == ""


def test_ensemble_is_the_mean_of_the_members_probabilities(tiny_sweep):
    """--ensemble over the chosen λ's seeds: per bag, mean probability (and attention) of the members."""
    members, what = ensemble_members(tiny_sweep.root)
    chosen = {name: t for name, t in tiny_sweep.trials.items() if t["path"] in members}
    assert len(members) == 2 and len({t["lam"] for t in chosen.values()}) == 1 and {t["seed"] for t in chosen.values()} == {0, 1}
    assert what.endswith("2 trials")
    per = [predict_split(load_run_model(m), tiny_sweep.data, "test", progress=False) for m in members]
    combined = ensemble(per)
    assert [b.key for b in combined] == [b.key for b in per[0]]
    for i, b in enumerate(combined):
        expected = (per[0][i].probs.astype(np.float64) + {x.key: x for x in per[1]}[b.key].probs.astype(np.float64)) / 2
        np.testing.assert_allclose(b.probs, expected, rtol=1e-6)
        assert float(b.attention.astype(np.float64).sum()) == pytest.approx(1.0, abs=1e-5)
    assert not np.allclose(per[0][0].probs, per[1][0].probs)  # two different models: the mean is not either


def test_predict_cli_writes_predictions_csv_and_the_ensemble(tiny_sweep, tmp_path):
    out = tmp_path / "ens" / "att.zarr"
    proc = subprocess.run([sys.executable, "-m", "aem_dist", "predict", "--run", tiny_sweep.root, "--ensemble", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ensemble of loss.lam = " in proc.stdout and "accuracy" in proc.stdout and "per-slide predictions:" in proc.stdout
    store = AttentionStore(str(out))
    assert len(store.attrs["ensemble"]) == 2
    with open(tmp_path / "ens" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(store) and {r["slide_id"] for r in rows} == set(store.slide_ids)
    for r, p in zip(rows, store.group["probs"][:]):
        assert float(r["p_" + store.attrs["class_names"][1]]) == pytest.approx(float(p[1]), abs=1e-6)
