"""Value checks: feature dtypes and ranges as training will see them, config files that are not text,
sweep grid values refused before Ray starts — each a one-line error, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from aem_dist.config import ConfigError, check_sweep_grid, load_config
from aem_dist.data.schema import BadSampleError, decode_bag
from tests.data.helpers import meta_json, npy


def _members(feats: np.ndarray) -> dict[str, bytes]:
    return {"feats.npy": npy(feats), "json": meta_json(slide_id="s", label=0, n_instances=len(feats))}


@pytest.mark.parametrize("dtype", [np.longdouble, np.complex64, np.int32, np.bool_])
def test_feature_dtypes_other_than_float16_32_64_are_refused(dtype):
    if np.dtype(dtype) == np.dtype(np.float64):  # platforms where longdouble is float64
        pytest.skip("longdouble is float64 here")
    with pytest.raises(BadSampleError, match=r"is not float16, float32 or float64 \[bad_dtype\]"):
        decode_bag(_members(np.ones((3, 4), dtype=dtype)))


def test_features_must_be_finite_after_conversion_for_training():
    feats = np.ones((3, 4), np.float64)
    assert decode_bag(_members(feats)).feats.dtype == np.float64
    feats[1, 2] = 1e300  # finite in float64, Inf in the float32 training packs
    with pytest.raises(BadSampleError, match=r"beyond float32 range.*\[non_finite\]"):
        decode_bag(_members(feats))


def test_config_files_must_be_regular_text_of_bounded_size(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)
    binary = tmp_path / "model.pt"
    binary.write_bytes(b"PK\x03\x04\xff\xfe\x00\x01" * 100)
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_config(binary)
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="more than a config can be"):
        load_config(big)
    run = subprocess.run([sys.executable, "-m", "aem_dist", "config", "show", "--config", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0 and "not a regular file" in run.stderr


def test_sweep_grid_values_are_checked_before_ray_starts(tmp_path):
    cfg = load_config("demo", {"sweep.grid": {"loss.lam": [0.0, -1.0], "train.seed": [0]}})
    with pytest.raises(ConfigError, match=r"sweep.grid point \{loss.lam: -1.0, train.seed: 0\}: loss.lam: Input should be greater than or equal to 0"):
        check_sweep_grid(cfg)
    assert check_sweep_grid(load_config("demo")) == len(load_config("demo").sweep.grid["loss.lam"]) * len(load_config("demo").sweep.grid["train.seed"])
    cmd = [sys.executable, "-m", "aem_dist", "sweep", "--config", "demo", "--out", str(tmp_path / "out"), "--set", "sweep.grid={model.name: [abmil, nosuchmodel], train.epochs: [0]}"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "sweep.grid point" in run.stderr and "Traceback" not in run.stderr
    assert "Ray" not in run.stderr and not (tmp_path / "out").exists()  # refused before Ray or any output
