"""Secrets in errors, records and logs: config errors never echo a secret or a whole section, URL
passwords are masked in what is stored and shown (never in what is used), debug logs carry no key id."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest

from aem_dist.config import ConfigError, dump_yaml, load_config
from aem_dist.engine.results import run_record

SECRET = "sEcReT-9f1e77"


@pytest.mark.parametrize(
    "text",
    [
        f"storage:\n  secret: {SECRET}\n  endpoint_urll: http://x\n",  # misspelt key next to the secret
        f"storage:\n  secret: [{SECRET}]\n",  # wrong type of the secret itself
        f"storage:\n  secret: {SECRET}\n  region: [a]\n",  # wrong type beside it
        f"storage:\n  secret: {SECRET}\nsweep:\n  grid: {{storage.secrett: [1]}}\n",  # whole-config check
    ],
)
def test_config_errors_never_print_secrets(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert SECRET not in message and "\n" not in message
    assert "storage." in message  # still names the key at fault


def test_stored_and_shown_urls_mask_passwords_but_runs_use_them():
    cfg = load_config(None, {"storage.endpoint_url": "http://user:pa55word@minio:9000", "metrics.pushgateway": "http://u:pw@gw:9091", "storage.secret": SECRET})
    record = json.dumps(run_record(cfg, "train"))
    assert "pa55word" not in record and ":pw@" not in record and SECRET not in record
    assert "http://***:***@minio:9000" in record
    shown = dump_yaml(cfg)
    assert "pa55word" not in shown and SECRET not in shown
    assert cfg.storage.endpoint_url == "http://user:pa55word@minio:9000"  # what is used is untouched
    assert cfg.to_dict(redact=False)["storage"]["secret"] == SECRET


@pytest.mark.integration
def test_bucket_named_like_key_id_works_and_debug_logs_carry_no_key(s3_server, tmp_path):
    """A bucket whose name equals the access-key id is used as is (only what is shown is redacted), and
    a debug run (botocore signs every request with the key id) logs no key and no secret."""
    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket(s3_server.key) + "/tiny"
    write_tiny(root, options=s3_server.options())
    env = {**os.environ, **s3_server.env(), "AEM_DEBUG": "1"}
    out = f"s3://{s3_server.key}/run"
    cmd = [sys.executable, "-m", "aem_dist", "train", "--config", "demo", "--set", f"data.root={root}", "--set", "train.epochs=1",
           "--set", "scaling.num_workers=0", "--set", "train.progress=false", "--set", "metrics.enabled=false", "--out", out]  # fmt: skip
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = run.stdout + run.stderr
    assert "botocore" in logs and "DEBUG" in logs  # the debug output really was on
    assert s3_server.key not in logs and s3_server.secret not in logs
    results = s3_server.options()
    from aem_dist import storage

    stored = json.loads(storage.read_bytes(f"{out}/results.json", results))
    assert stored["config"]["data"]["root"] == root  # stored as used: not a redacted s3://***/…


def test_tune_callback_pickles_no_secret():
    """Tune pickles callbacks into tuner.pkl on the output prefix: keys given in the config must not be in it."""
    import cloudpickle

    from aem_dist.observe.callbacks import TuneMetricsCallback

    cfg = load_config(None, {"storage.key": "AKIAKEYID77", "storage.secret": SECRET})
    blob = cloudpickle.dumps(TuneMetricsCallback(cfg, None, print_table=False))
    assert SECRET.encode() not in blob and b"AKIAKEYID77" not in blob
    assert cfg.storage.secret.get_secret_value() == SECRET  # the caller's config keeps them


def test_ray_filesystem_pickles_no_credentials():
    """What Ray ships to workers and Tune writes into tuner.pkl: keys resolved where used, never carried."""
    from aem_dist import storage
    from aem_dist.storage import StorageOptions

    options = StorageOptions(endpoint_url="http://127.0.0.1:9", key="AKIAKEYID77", secret=SECRET, region="us-east-1")
    fs, path = storage.ray_storage_filesystem("s3://bucket/prefix", options)
    blob = pickle.dumps(fs)
    assert path == "bucket/prefix" and b"127.0.0.1:9" in blob
    assert SECRET.encode() not in blob and b"AKIAKEYID77" not in blob
