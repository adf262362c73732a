"""predict --checkpoint best|last|epoch-N; heatmaps named by slide id on real pixel axes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from aem_dist.observe.attention import AttentionStore, BagResult, write_attention
from aem_dist.observe.heatmap import render, render_store

from .conftest import EPOCHS


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, timeout=300)


def test_predict_checkpoint_last_and_a_missing_epoch(tiny_sweep, tmp_path):
    trial = tiny_sweep.trials["trial_0001"]["path"]
    out = tmp_path / "last.zarr"
    proc = run_cli("predict", "--run", trial, "--data", tiny_sweep.data, "--out", str(out), "--split", "val", "--checkpoint", "last")
    assert proc.returncode == 0, proc.stderr
    store = AttentionStore(str(out))
    assert store.attrs["checkpoint_epoch"] == EPOCHS - 1 and store.attrs["checkpoint"] == "last"
    proc = run_cli("predict", "--run", trial, "--data", tiny_sweep.data, "--out", str(tmp_path / "x.zarr"), "--checkpoint", "epoch-99")
    assert proc.returncode == 2 and "no checkpoint of epoch 99 (kept: " in proc.stderr and f"epoch-{EPOCHS - 1}" in proc.stderr


def _bag(slide_id: str, key: str) -> BagResult:
    xy = np.array([[1024 + 256 * i, 4096 + 256 * j] for i in range(3) for j in range(2)], dtype=np.int32)
    att = np.linspace(1, 2, len(xy))
    return BagResult(slide_id, key, "test", 1, np.array([0.3, 0.7]), att / att.sum(), xy)


def test_heatmaps_are_named_by_slide_id_on_slide_pixel_axes(tmp_path):
    bag = _bag("TCGA-A1.01/x", "TCGA-A1-01-x")
    fig = render(bag, ["normal", "tumor"])
    ax = fig.axes[0]
    assert ax.get_xlim() == (1024, 1024 + 3 * 256) and sorted(ax.get_ylim()) == [4096, 4096 + 2 * 256]
    out = str(tmp_path / "a.zarr")
    write_attention(out, [bag, _bag("plain", "plain")], class_names=["normal", "tumor"])
    written = render_store(out, str(tmp_path / "heat"), progress=False)
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["TCGA-A1.01_x.png", "plain.png"]
