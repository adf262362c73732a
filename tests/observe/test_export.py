"""`aem-dist export`: a model file with weights, config and class names, reloaded without its run folder,
predicts exactly what the run's checkpoint predicts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from aem_dist.observe.attention import AttentionStore, load_run_model, predict_split
from aem_dist.observe.export import FORMAT, export_model, load_exported, read_metadata


def test_export_reload_predicts_identically(tiny_sweep, tmp_path):
    name, trial = next(iter(tiny_sweep.trials.items()))
    run = load_run_model(trial["path"])
    out = tmp_path / "model.safetensors"
    export_model(run, str(out))
    # the run folder is gone: the file alone rebuilds the model
    moved = tmp_path / "elsewhere"
    shutil.copytree(trial["path"], moved)
    shutil.rmtree(trial["path"])
    try:
        again = load_exported(str(out))
        meta = read_metadata(out.read_bytes(), "x")
        assert meta["format"] == FORMAT and json.loads(meta["class_names"]) == run.meta["class_names"]
        assert again.meta == run.meta and again.epoch == run.epoch and again.config["loss"]["lam"] == trial["lam"]
        a = predict_split(run, tiny_sweep.data, "test", progress=False)
        b = predict_split(again, tiny_sweep.data, "test", progress=False)
        for x, y in zip(a, b):
            assert x.key == y.key
            np.testing.assert_array_equal(x.probs, y.probs)
            np.testing.assert_array_equal(x.attention, y.attention)
    finally:
        shutil.rmtree(trial["path"], ignore_errors=True)
        shutil.copytree(moved, trial["path"])


def test_export_and_predict_cli(tiny_sweep, tmp_path):
    trial = next(iter(tiny_sweep.trials.values()))
    model = tmp_path / "m.safetensors"
    run = subprocess.run([sys.executable, "-m", "aem_dist", "export", "--run", trial["path"], "--out", str(model)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "classes" in run.stdout
    pred = subprocess.run([sys.executable, "-m", "aem_dist", "predict", "--run", str(model), "--data", tiny_sweep.data, "--out", str(tmp_path / "p.zarr")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert pred.returncode == 0, pred.stderr
    assert len(AttentionStore(str(tmp_path / "p.zarr"))) > 0
    bad = subprocess.run([sys.executable, "-m", "aem_dist", "export", "--run", trial["path"], "--out", str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "must end in .safetensors" in bad.stderr


def test_a_foreign_safetensors_file_is_refused(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not an aem-dist model export"):
        load_exported(str(path))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_exported(str(tmp_path / "junk.safetensors"))
