"""A sweep whose S3 secret is given in the config: the secret never enters os.environ of the Ray
processes (Ray copies AWS_* variables into its workers' runtime environment and writes them in clear
into runtime_env_agent.log, a folder that survives a SIGKILL); it reaches them as a 0600 credentials
file named by AWS_SHARED_CREDENTIALS_FILE, removed with the session."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from aem_dist import storage
from aem_dist.config import load_config

pytestmark = pytest.mark.integration


def test_config_secret_is_in_no_ray_log_and_no_environment(s3_server, demo_data, tmp_path, monkeypatch):
    import ray

    from aem_dist.orchestrate.ray_env import ray_session
    from aem_dist.orchestrate.sweep import run_sweep

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    out = s3_server.make_bucket("raysecrets") + "/sweep"
    overrides = {
        "data.root": demo_data, "train.epochs": 1, "train.progress": False, "metrics.enabled": False,
        "sweep.grid": {"scaling.num_workers": [1]}, "data.cache_dir": str(tmp_path / "cache"),
        "storage.endpoint_url": s3_server.endpoint_url, "storage.key": s3_server.key, "storage.secret": s3_server.secret,
    }  # fmt: skip
    cfg = load_config("demo", overrides)
    with ray_session(cfg=cfg, num_cpus=2):
        creds = os.environ["AWS_SHARED_CREDENTIALS_FILE"]
        assert stat.S_IMODE(os.stat(creds).st_mode) == 0o600 and stat.S_IMODE(os.stat(os.path.dirname(creds)).st_mode) == 0o700
        assert s3_server.secret not in "".join(os.environ.values())
        run_sweep(cfg, out, announce=lambda _: None)

        @ray.remote(num_cpus=0.01)
        def environment() -> str:
            return "".join(os.environ.values())

        assert s3_server.secret not in ray.get(environment.remote())
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        files = [p for p in session.rglob("*") if p.is_file() and not p.is_symlink()]
        assert any(p.name.startswith("runtime_env") for p in files)  # the scan covers Ray's agent logs
        for p in files:
            data = p.read_bytes()
            assert s3_server.secret.encode() not in data and s3_server.key.encode() not in data, p
    assert not os.path.exists(creds) and "AWS_SHARED_CREDENTIALS_FILE" not in os.environ
    s3 = storage.open_fs(out, s3_server.options())[0]
    assert s3.exists("raysecrets/sweep/trials.csv")  # the trial reached the bucket with the file's credentials
