"""Fixtures for the observe tests: a tiny finished sweep built in-process, and an S3 bucket."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import pytest


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
    base = load_config("demo", [f"data.root={demo_data}", f"train.epochs={EPOCHS}", "train.progress=false", "run.name=tiny", "metrics.enabled=false", "scaling.num_workers=0"])
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
    key: str
    secret: str


@pytest.fixture
def observe_s3(s3_server, monkeypatch):
    """A fresh bucket on the shared SeaweedFS server (tests/fixtures/seaweedfs.py); AWS_* point at it."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = s3_server.make_bucket(f"observe-{uuid.uuid4().hex[:8]}").removeprefix("s3://")
    return S3(s3_server.endpoint_url, bucket, s3_server.key, s3_server.secret)
