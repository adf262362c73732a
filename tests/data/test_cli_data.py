"""`aem-dist synth | ingest | verify` as a user runs them, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "aem_dist", *args], capture_output=True, text=True, env=full_env, timeout=timeout)


def test_synth_to_s3_then_verify_and_detect_corruption(s3_server):
    import s3fs

    url = s3_server.make_bucket("cli-synth") + "/demo"
    env = s3_server.env()
    r = cli("synth", "--preset", "demo", "--out", url, "--shard-mb", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "wrote demo" in r.stdout
    r = cli("verify", url, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "OK: " in r.stdout and "176 bags verified" in r.stdout
    fs = s3fs.S3FileSystem(**s3_server.options().s3_kwargs())
    path = "cli-synth/demo/val-000000.tar"
    data = bytearray(fs.cat_file(path))
    data[len(data) // 3] ^= 0x55
    fs.pipe_file(path, bytes(data))
    r = cli("verify", url, env=env)
    assert r.returncode == 1
    assert "FAIL val-000000.tar" in r.stdout and "sha256 MISMATCH" in r.stdout and "PROBLEMS FOUND" in r.stdout
    assert s3_server.secret not in r.stdout + r.stderr


def test_ingest_to_s3(s3_server, tmp_path):
    path = tmp_path / "acmil.h5"
    with h5py.File(path, "w") as f:
        for i in range(10):
            g = f.create_group(f"case_{i}")
            g["feat"] = np.full((3 + i, 5), i, np.float32)
            g["coords"] = np.zeros((3 + i, 2), np.int32)
            g.attrs["label"] = ["benign", "malignant"][i % 2]
    url = s3_server.make_bucket("cli-ingest") + "/acmil"
    r = cli("ingest", "--format", "acmil", "--src", str(path), "--out", url, "--val-frac", "0.2", "--test-frac", "0.2", env=s3_server.env())
    assert r.returncode == 0, r.stderr
    assert "classes ['benign', 'malignant']" in r.stdout
    r = cli("verify", url, env=s3_server.env())
    assert r.returncode == 0 and "10 bags verified" in r.stdout


def test_wrong_credentials_and_missing_dataset_are_clear(s3_server, tmp_path):
    url = s3_server.make_bucket("cli-creds") + "/demo"
    env = {**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-0000"}
    r = cli("synth", "--preset", "demo", "--out", url, env=env, timeout=60)
    assert r.returncode == 2
    assert "access denied" in r.stderr and "wrong-secret-0000" not in r.stderr and "Traceback" not in r.stderr
    r = cli("verify", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no manifest" in r.stdout  # cannot read: 2, as docs/data.md says
