"""The streaming loader inside real Ray Train workers (2 ranks × 2 DataLoader workers), reading from
SeaweedFS, with Ray's checkpoints on the same S3 server through ``storage.ray_storage_filesystem``."""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from aem_dist import storage

pytestmark = pytest.mark.integration


def train_loop(config: dict) -> None:
    import ray.train
    from ray.train import Checkpoint

    from aem_dist.config import DataConfig
    from aem_dist.data.loader import LoaderSpec
    from aem_dist.data.manifest import load_manifest
    from aem_dist.data.stream import open_stream

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    manifest = load_manifest(config["root"])  # endpoint and keys from the AWS_* variables
    cfg = DataConfig(root=config["root"], loader="stream", num_workers=2, cache_dir=config["cache"])
    loader = open_stream(cfg, manifest, LoaderSpec("train", rank, world, True, seed=5))
    out = {}
    for epoch in (0, 1):
        out[epoch] = [k for b in loader.epoch(epoch) for k in b.keys]
    with tempfile.TemporaryDirectory() as d:
        Path(d, f"keys-rank{rank}.json").write_text(json.dumps({"steps": loader.steps(0), "keys": out}))
        ray.train.report({"steps": len(out[0])}, checkpoint=Checkpoint.from_directory(d))


def test_ray_train_workers_stream_from_s3(s3_server, tmp_path, monkeypatch):
    from tests.conftest import require

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from tests.data.helpers import write_tiny

    opts = s3_server.options()
    root = s3_server.make_bucket("ray-stream") + "/tiny"
    manifest = write_tiny(root, n_train=14, n_val=2, options=opts)
    ckpt_url = s3_server.make_bucket("ray-ckpt") + "/runs"
    fs, path = storage.ray_storage_filesystem(ckpt_url, opts)
    require(fs is not None, "S3 filesystem for Ray")

    from aem_dist.orchestrate.ray_env import ray_session

    for name, value in s3_server.env().items():  # the local Ray's workers inherit these
        monkeypatch.setenv(name, value)
    with ray_session(num_cpus=4):
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"root": root, "cache": str(tmp_path / "cache")},
            scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="stream-test", storage_path=path, storage_filesystem=fs),
        )
        result = trainer.fit()
    assert result.error is None
    # The checkpoint is on S3: read both ranks' records back through our own fsspec view.
    ckpt = result.checkpoint
    assert ckpt is not None and ckpt.path.startswith("ray-ckpt/runs/stream-test")
    records = [json.loads(storage.read_bytes(f"s3://{ckpt.path}/keys-rank{r}.json", opts)) for r in range(2)]
    assert records[0]["steps"] == records[1]["steps"] == 7
    for epoch in ("0", "1"):
        seen = Counter(k for rec in records for k in rec["keys"][epoch])
        assert set(seen) == {b.key for b in manifest.splits["train"].bags()} and set(seen.values()) == {1}
    assert records[0]["keys"]["0"] != records[0]["keys"]["1"]
    assert s3_server.secret not in json.dumps(records)
    # Nothing Ray stored on S3 (checkpoints, run state) carries the credentials.
    s3 = storage.open_fs(ckpt_url, opts)[0]
    stored = s3.find("ray-ckpt")
    assert stored and not [p for p in stored if s3_server.secret.encode() in s3.cat_file(p)]
