"""storage.py without a server: URLs, local atomic writes, redaction, retries, Ray's local filesystem."""

from __future__ import annotations

import os

import pytest

from aem_dist import storage
from aem_dist.storage import StorageOptions


def test_strip_scheme_and_join():
    assert storage.strip_scheme("s3://b/p/x") == "b/p/x"
    assert storage.strip_scheme("file:///tmp/x") == "/tmp/x"
    assert storage.strip_scheme("/tmp/x") == "/tmp/x"
    assert storage.join("s3://b/p/", "/a/", "c") == "s3://b/p/a/c"
    assert storage.is_remote("s3://b") and not storage.is_remote("/x") and not storage.is_remote("file:///x")


def test_redact_removes_known_secrets_env_and_userinfo(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-123")
    opts = StorageOptions(endpoint_url="http://h:1", key="AKIAKEY", secret="opt-secret-456")
    text = "key AKIAKEY secret opt-secret-456 env env-secret-123 url s3://user:pw@host/b"
    out = storage.redact(text, opts)
    for s in ("AKIAKEY", "opt-secret-456", "env-secret-123", "user:pw"):
        assert s not in out
    assert "s3://***:***@host/b" in out
    assert "opt-secret-456" not in repr(opts)


def test_local_atomic_write_leaves_no_temp(tmp_path):
    url = f"file://{tmp_path}/sub/a.bin"
    storage.atomic_write_bytes(url, b"abc")
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"abc"
    with pytest.raises(ValueError):
        with storage.atomic_open(str(tmp_path / "sub" / "b.bin")) as f:
            f.write(b"partial")
            raise ValueError("boom")
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.bin"]


def test_with_retries_retries_transient_only():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    assert storage.with_retries(flaky, what="x", retries=5, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0]

    def denied():
        calls.append(1)
        raise PermissionError("denied")

    calls.clear()
    with pytest.raises(PermissionError):
        storage.with_retries(denied, what="x", retries=5, sleep=sleeps.append)
    assert len(calls) == 1

    def down():
        raise ConnectionRefusedError("refused")

    sleeps.clear()
    with pytest.raises(ConnectionRefusedError):
        storage.with_retries(down, what="x", retries=4, sleep=sleeps.append)
    assert sleeps == [0.5, 1.0, 2.0, 4.0]  # bounded


def test_ray_storage_filesystem_local(tmp_path):
    fs, path = storage.ray_storage_filesystem(str(tmp_path / "runs"))
    assert fs is None and path == str(tmp_path / "runs")
    fs, path = storage.ray_storage_filesystem(f"file://{tmp_path}/runs")
    assert fs is None and path == str(tmp_path / "runs")


def test_ray_storage_filesystem_other_fsspec():
    import pyarrow.fs as pafs

    fs, path = storage.ray_storage_filesystem("memory://bucket/runs")
    assert isinstance(fs, pafs.PyFileSystem)
    with fs.open_output_stream(f"{path}/a.txt") as f:
        f.write(b"hi")
    with fs.open_input_stream(f"{path}/a.txt") as f:
        assert f.read() == b"hi"
