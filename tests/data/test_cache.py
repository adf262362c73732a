"""The node-local shard cache: verified fills, sharing, LRU bound, damaged entries, bad shards."""

from __future__ import annotations

import hashlib
import os

import fsspec
import pytest

from aem_dist.data import cache as cache_mod
from aem_dist.data.cache import ShardCache
from aem_dist.data.schema import BadSampleError


def put(name: str, data: bytes) -> tuple[str, str, int]:
    """An object on fsspec's in-memory filesystem (a remote URL without a server)."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file(f"/cachetest/{name}", data)
    return f"memory://cachetest/{name}", hashlib.sha256(data).hexdigest(), len(data)


def test_fill_then_hit_shared_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(cache_mod, "CHUNK", 1000)  # several ranged reads per shard
    data = os.urandom(5500)
    url, sha, n = put("a.tar", data)
    c = ShardCache(str(tmp_path), 1 << 20)
    with c.open(url, "a.tar", sha, n) as f:
        assert f.read() == data
    assert (c.fills, c.hits) == (1, 0)
    other = ShardCache(str(tmp_path), 1 << 20)  # another process / trial on the node
    url2, _, _ = put("copy-under-another-name.tar", data)
    with other.open(url2, "x.tar", sha, n) as f:
        assert f.read() == data
    assert (other.fills, other.hits) == (0, 1)
    assert c.entry_path(sha).exists() and c.entry_path(sha).with_suffix(".ok").read_text() == cache_mod.BOOT_ID


def test_lru_eviction_keeps_the_bound(tmp_path):
    c = ShardCache(str(tmp_path), 2500)
    shards = [put(f"s{i}.tar", os.urandom(1000)) for i in range(4)]
    for i, (url, sha, n) in enumerate(shards):
        c.open(url, f"s{i}.tar", sha, n).close()
        os.utime(c.entry_path(sha), (i, i))  # deterministic recency
    assert c.usage() <= 2500
    present = [c.entry_path(sha).exists() for _, sha, _ in shards]
    assert present == [False, False, True, True]


def test_damaged_entry_from_an_earlier_boot_is_refetched(tmp_path):
    data = os.urandom(3000)
    url, sha, n = put("d.tar", data)
    c = ShardCache(str(tmp_path), 1 << 20)
    c.open(url, "d.tar", sha, n).close()
    entry = c.entry_path(sha)
    entry.write_bytes(b"\0" * n)  # what a crash could leave: right size, wrong bytes
    entry.with_suffix(".ok").write_text("another-boot")
    with c.open(url, "d.tar", sha, n) as f:
        assert f.read() == data
    assert c.fills == 2


def test_mismatch_and_missing_shards(tmp_path):
    url, sha, n = put("m.tar", b"x" * 100)
    c = ShardCache(str(tmp_path), 1 << 20)
    with pytest.raises(BadSampleError) as info:
        c.open(url, "m.tar", "0" * 64, n)
    assert info.value.reason == "sha256_mismatch" and info.value.shard == "m.tar"
    with pytest.raises(BadSampleError, match="manifest: 99 bytes"):
        c.open(url, "m.tar", sha, 99)
    with pytest.raises(BadSampleError) as info:
        c.open("memory://cachetest/nope.tar", "nope.tar", sha, n)
    assert info.value.reason == "missing_shard"
    assert not list(tmp_path.glob("shards/*/*.tar"))
    assert not list((tmp_path / "tmp").iterdir())


def test_local_shards_are_verified_once_not_copied(tmp_path):
    p = tmp_path / "local.tar"
    p.write_bytes(b"abc" * 100)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    c = ShardCache(str(tmp_path / "cache"), 1 << 20)
    c.open(str(p), "local.tar", sha, 300).close()
    assert (tmp_path / "cache" / "verified" / sha).exists() and not (tmp_path / "cache" / "shards").exists()
    p.write_bytes(b"abd" * 100)  # changed after verification: mtime/size stamp no longer matches
    with pytest.raises(BadSampleError, match="sha256"):
        c.open(str(p), "local.tar", sha, 300)
