"""The data plane against a real S3 server (SeaweedFS): write, verify, stream, cache, failures."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from aem_dist.config import DataConfig
from aem_dist.data.loader import LoaderSpec, open_memory
from aem_dist.data.registry import open_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.synthetic import get_spec, write_synthetic
from aem_dist.data.verify import verify_dataset
from aem_dist.storage import StorageError

pytestmark = pytest.mark.integration

SHARD_BYTES = 120_000  # the demo preset in ~12 shards


@pytest.fixture(scope="module")
def demo_pair(s3_server, tmp_path_factory):
    """The demo preset written locally and to S3 with the same seed."""
    local = str(tmp_path_factory.mktemp("demo-local"))
    remote = s3_server.make_bucket("stream-demo") + "/demo"
    opts = s3_server.options()
    write_synthetic(get_spec("demo"), local, 0, shard_bytes=SHARD_BYTES, progress=False)
    write_synthetic(get_spec("demo"), remote, 0, shard_bytes=SHARD_BYTES, options=opts, progress=False)
    return local, remote


def cfg_for(root, tmp_path, **kw):
    return DataConfig(root=root, loader="stream", cache_dir=str(tmp_path / "cache"), **kw)


def test_s3_dataset_verifies_and_matches_local_bit_for_bit(demo_pair, s3_server, tmp_path):
    local, remote = demo_pair
    opts = s3_server.options()
    m_local, m_remote = load_manifest(local), load_manifest(remote, opts)
    assert [s.sha256 for e in m_remote.splits.values() for s in e.shards] == [s.sha256 for e in m_local.splits.values() for s in e.shards]
    report = verify_dataset(remote, opts, progress=False)
    assert report.ok, report.text()
    assert report.n_bags == sum(e.n_bags for e in m_remote.splits.values())
    for split in ("val", "test"):
        spec = LoaderSpec(split, 0, 1, False, max_bags=4, with_coords=True)
        mem = list(open_memory(local, m_local, spec).epoch(0))
        got = list(open_split(cfg_for(remote, tmp_path), m_remote, spec, opts).epoch(0))
        assert [b.keys for b in got] == [b.keys for b in mem]
        assert all(torch.equal(a.feats, b.feats) and torch.equal(a.coords, b.coords) for a, b in zip(got, mem))


def test_two_ranks_two_workers_from_s3(demo_pair, s3_server, tmp_path):
    _, remote = demo_pair
    opts = s3_server.options()
    m = load_manifest(remote, opts)
    cfg = cfg_for(remote, tmp_path, num_workers=2)
    orders = {}
    for epoch in (0, 1):
        seen: Counter = Counter()
        steps = []
        for rank in range(2):
            loader = open_split(cfg, m, LoaderSpec("train", rank, 2, True, seed=11), opts)
            keys = [k for b in loader.epoch(epoch) for k in b.keys]
            steps.append(len(keys))
            seen.update(keys)
            orders[(epoch, rank)] = keys
        assert steps[0] == steps[1] == 48  # 96 bags / 2 ranks, batch of 1
        assert set(seen) == {b.key for b in m.splits["train"].bags()} and set(seen.values()) == {1}
    assert orders[(0, 0)] != orders[(1, 0)]
    again = open_split(cfg, m, LoaderSpec("train", 0, 2, True, seed=11), opts)
    assert [k for b in again.epoch(0) for k in b.keys] == orders[(0, 0)]


def test_cache_serves_epoch_two_and_other_trials_without_s3(s3_server, tmp_path):
    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket("stream-cache") + "/tiny"
    opts = s3_server.options()
    write_tiny(root, n_train=8, n_val=4, options=opts)
    m = load_manifest(root, opts)
    cfg = cfg_for(root, tmp_path, cache_max_gb=1.0)
    spec = LoaderSpec("train", 0, 1, True)
    first = [k for b in open_split(cfg, m, spec, opts).epoch(0) for k in b.keys]
    entries = list((tmp_path / "cache" / "shards").glob("*/*.tar"))
    assert sorted(p.stem for p in entries) == sorted(s.sha256 for s in m.splits["train"].shards)
    s3_server.stop()
    try:
        second = [k for b in open_split(cfg, m, spec, opts).epoch(1) for k in b.keys]  # another loader: another trial
    finally:
        s3_server.start()
    assert sorted(second) == sorted(first)


def test_server_restart_mid_epoch_completes(s3_server, tmp_path, caplog):
    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket("stream-restart") + "/tiny"
    opts = s3_server.options()
    write_tiny(root, n_train=16, n_val=2, shard_bytes=200, options=opts)  # one bag per shard
    m = load_manifest(root, opts)
    loader = open_split(cfg_for(root, tmp_path, prefetch=1, retries=6), m, LoaderSpec("train", 0, 1, False), opts)
    caplog.set_level(logging.WARNING)
    it = loader.epoch(0)
    keys = list(next(it).keys)
    s3_server.stop()
    restarter = threading.Thread(target=lambda: (time.sleep(1.5), s3_server.start()))
    restarter.start()
    try:
        keys += [k for b in it for k in b.keys]
    finally:
        restarter.join()
    assert sorted(keys) == sorted(b.key for b in m.splits["train"].bags())
    assert any("retry" in r.getMessage() for r in caplog.records)  # the downtime was really hit


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_wrong_credentials_in_loader_fail_fast(s3_server, tmp_path, policy):
    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket("stream-creds") + "/tiny"
    write_tiny(root, n_train=4, n_val=2, options=s3_server.options())
    m = load_manifest(root, s3_server.options())
    bad = s3_server.options(secret="not-the-secret-xyz")
    with pytest.raises(StorageError) as info:
        load_manifest(root, bad)
    assert "access denied" in str(info.value)
    loader = open_split(cfg_for(root, tmp_path, on_bad_sample=policy), m, LoaderSpec("train", 0, 1, True, on_bad_sample=policy), bad)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        list(loader.epoch(0))
    assert time.monotonic() - t0 < 30
    assert "access denied" in str(info.value) and "not-the-secret-xyz" not in str(info.value)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_unreachable_endpoint_in_loader_bounded(s3_server, tmp_path, policy):
    import socket

    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket("stream-down") + "/tiny"
    write_tiny(root, n_train=4, n_val=2, options=s3_server.options())
    m = load_manifest(root, s3_server.options())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    down = s3_server.options(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1.0, attempts_per_request=1)
    with pytest.raises(StorageError, match="cannot connect"):
        load_manifest(root, down)
    loader = open_split(cfg_for(root, tmp_path, on_bad_sample=policy, retries=1), m, LoaderSpec("train", 0, 1, True, on_bad_sample=policy), down)
    t0 = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot connect.*127.0.0.1:{port}"):
        list(loader.epoch(0))
    assert time.monotonic() - t0 < 30


def test_sha256_mismatch_on_s3_never_enters_cache(s3_server, tmp_path):
    import s3fs

    from aem_dist.data.schema import BadSampleError
    from tests.data.helpers import write_tiny

    root = s3_server.make_bucket("stream-sha") + "/tiny"
    opts = s3_server.options()
    m = write_tiny(root, n_train=4, n_val=2, options=opts)
    shard = m.splits["train"].shards[0]
    fs = s3fs.S3FileSystem(**opts.s3_kwargs())
    path = f"stream-sha/tiny/{shard.name}"
    data = bytearray(fs.cat_file(path))
    data[700] ^= 1
    fs.pipe_file(path, bytes(data))
    with pytest.raises(BadSampleError) as info:
        list(open_split(cfg_for(root, tmp_path), m, LoaderSpec("train", 0, 1, True), opts).epoch(0))
    assert info.value.reason == "sha256_mismatch" and info.value.shard == shard.name
    assert not list(Path(tmp_path / "cache").glob(f"shards/*/{shard.sha256}.tar"))
    assert not verify_dataset(root, opts, progress=False).ok
