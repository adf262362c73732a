"""A sweep on a shared bucket: nothing it writes carries a credential, and resuming it never unpickles
anything from the output prefix (a planted pickle's payload never runs)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from aem_dist import storage
from aem_dist.config import load_config

pytestmark = pytest.mark.integration

GRID = {"scaling.num_workers": [0, 1]}  # an in-process trial and a Ray Train (TorchTrainer) trial


class _Payload:
    """Unpickling this creates a file: proof that something loaded it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _all_bytes(s3, bucket: str, local: Path) -> list[tuple[str, bytes]]:
    found = [(p, s3.cat_file(p)) for p in s3.find(bucket)]
    found += [(str(p), p.read_bytes()) for p in local.rglob("*") if p.is_file()]
    return found


def test_s3_sweep_stores_no_secret_and_resume_loads_no_pickle(s3_server, demo_data, tmp_path, monkeypatch):
    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    for name, value in s3_server.env().items():  # keys only in the environment, as on a cluster
        monkeypatch.setenv(name, value)
    out = s3_server.make_bucket("hardening") + "/sweep"
    overrides = {
        "data.root": demo_data, "train.epochs": 2, "train.progress": False, "metrics.enabled": False,
        "sweep.grid": GRID, "sweep.max_concurrent_trials": 1, "data.cache_dir": str(tmp_path / "cache"),
    }  # fmt: skip
    cfg = load_config("demo", overrides)
    with ray_session(cfg=cfg, num_cpus=3):
        run_sweep(cfg, out, announce=lambda _: None)

        # Every byte the sweep wrote, Tune's pickled state included, is free of the key and the secret.
        s3 = storage.open_fs(out, s3_server.options())[0]
        written = _all_bytes(s3, "hardening", tmp_path)
        assert any(p.endswith("tuner.pkl") for p, _ in written)  # the scan covers Tune's state
        for path, data in written:
            assert s3_server.secret.encode() not in data and s3_server.key.encode() not in data, path

        # An attacker with write access to the prefix plants pickles where Tune's restore would load them.
        exp = f"hardening/sweep/ray/{cfg.run.name}"
        marker = tmp_path / "pwned"
        evil = pickle.dumps(_Payload(str(marker)))
        s3.pipe_file(f"{exp}/tuner.pkl", evil)
        state = {"trial_data": [], "runner_data": {"_type": "CLOUDPICKLE_FALLBACK", "value": evil.hex()}}
        s3.pipe_file(f"{exp}/experiment_state-2099-01-01_00-00-00.json", json.dumps(state).encode())
        # One trial is "unfinished": its results.json is gone; the other must not run again.
        kept = s3.cat_file("hardening/sweep/trials/num_workers=0/results.json")
        s3.rm_file("hardening/sweep/trials/num_workers=1/results.json")
        kept_info = s3.info("hardening/sweep/trials/num_workers=0/results.json")

        run_sweep(cfg, out, resume=True, announce=lambda _: None)

    assert not marker.exists(), "a pickle from the output prefix was loaded"
    assert s3.cat_file("hardening/sweep/trials/num_workers=0/results.json") == kept
    assert s3.info("hardening/sweep/trials/num_workers=0/results.json")["LastModified"] == kept_info["LastModified"]
    redone = json.loads(s3.cat_file("hardening/sweep/trials/num_workers=1/results.json"))
    assert redone["resumed_after_epoch"] == 1  # continued from its last Ray Train checkpoint (weights only)
    for path, data in _all_bytes(s3, "hardening", tmp_path):
        assert s3_server.secret.encode() not in data and s3_server.key.encode() not in data, path
