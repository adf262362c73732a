"""storage.py against a real S3 server (SeaweedFS): URLs, atomic writes, fast clear errors, Ray's filesystem."""

from __future__ import annotations

import socket
import time

import pytest

from aem_dist import storage
from aem_dist.storage import StorageError, StorageOptions

pytestmark = pytest.mark.integration


def test_write_read_atomic_on_s3(s3_server):
    root = s3_server.make_bucket("st-basic") + "/some/prefix"
    opts = s3_server.options()
    storage.atomic_write_text(storage.join(root, "a.txt"), "hello", opts)
    assert storage.read_bytes(storage.join(root, "a.txt"), opts) == b"hello"
    assert storage.exists(storage.join(root, "a.txt"), opts)
    # A failing block leaves nothing under the final name.
    with pytest.raises(RuntimeError):
        with storage.atomic_open(storage.join(root, "b.bin"), opts) as f:
            f.write(b"x" * 100)
            raise RuntimeError("boom")
    assert not storage.exists(storage.join(root, "b.bin"), opts)


def test_options_from_aws_env(s3_server, monkeypatch):
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    opts = StorageOptions.from_config()
    assert opts.endpoint_url == s3_server.endpoint_url and opts.key == s3_server.key and opts.secret == s3_server.secret
    root = s3_server.make_bucket("st-env")
    storage.atomic_write_bytes(f"{root}/x.bin", b"abc", opts)
    assert storage.read_bytes(f"{root}/x.bin") == b"abc"  # options resolved from the environment
    assert s3_server.secret not in repr(opts) and s3_server.key not in repr(opts)


def test_wrong_credentials_fail_fast_and_redacted(s3_server):
    root = s3_server.make_bucket("st-creds")
    storage.atomic_write_bytes(f"{root}/x.bin", b"abc", s3_server.options())
    bad = s3_server.options(secret="totally-wrong-secret-value")
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes(f"{root}/x.bin", bad, retries=5)  # auth errors are not retried
    assert time.monotonic() - t0 < 20
    msg = str(info.value)
    assert "access denied" in msg and "AWS_SECRET_ACCESS_KEY" in msg
    assert "totally-wrong-secret-value" not in msg and s3_server.secret not in msg
    with pytest.raises(StorageError, match="access denied"):
        storage.probe(root, bad, write=True)
    with pytest.raises(StorageError, match="access denied"):
        storage.atomic_write_bytes(f"{root}/y.bin", b"abc", bad)


def test_unreachable_endpoint_fails_fast(s3_server):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = s3_server.options(endpoint_url=f"http://127.0.0.1:{port}", connect_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(StorageError) as info:
        storage.read_bytes("s3://st-basic/x", opts)
    assert time.monotonic() - t0 < 30  # bounded: a couple of attempts, never a hang
    assert "cannot connect" in str(info.value) and f"127.0.0.1:{port}" in str(info.value)
    assert s3_server.secret not in str(info.value)
    with pytest.raises(StorageError, match="cannot connect"):
        storage.probe("s3://st-basic/x", opts)


def test_missing_bucket_is_clear(s3_server):
    with pytest.raises(StorageError, match="does not exist"):
        storage.probe("s3://no-such-bucket-aem/x", s3_server.options())


def test_ray_storage_filesystem_s3_roundtrip(s3_server, monkeypatch):
    import pyarrow.fs as pafs

    for name, value in s3_server.env().items():  # Ray's filesystem finds credentials where it is used
        monkeypatch.setenv(name, value)

    root = s3_server.make_bucket("st-ray") + "/experiments"
    fs, path = storage.ray_storage_filesystem(root, s3_server.options())
    assert isinstance(fs, pafs.S3FileSystem) and path == "st-ray/experiments"
    fs.create_dir(f"{path}/run-a")
    with fs.open_output_stream(f"{path}/run-a/checkpoint.bin") as f:
        f.write(b"state" * 1000)
    with fs.open_input_stream(f"{path}/run-a/checkpoint.bin") as f:
        assert f.read() == b"state" * 1000
    # The same object is visible through our fsspec view of the bucket.
    assert storage.read_bytes(f"{root}/run-a/checkpoint.bin", s3_server.options()) == b"state" * 1000
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    assert any(i.path.endswith("checkpoint.bin") and i.size == 5000 for i in infos)


def test_ray_storage_filesystem_is_picklable_without_secrets(s3_server, monkeypatch):
    import pickle

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    fs, path = storage.ray_storage_filesystem("s3://st-ray/p", s3_server.options())
    blob = pickle.dumps(fs)  # Ray ships it to workers; Tune pickles it into tuner.pkl on storage
    assert s3_server.secret.encode() not in blob and s3_server.key.encode() not in blob
    fs2 = pickle.loads(blob)
    assert fs2.get_file_info(path).type is not None
