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


# --- shared nodes: another user must not be able to plant what a run trains on --------------------


def test_world_writable_or_foreign_cache_is_refused(tmp_path):
    from aem_dist.storage import StorageError

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(StorageError, match=r"writable by group or others \(mode 777\).*data.cache_dir"):
        ShardCache(str(shared), 1 << 20)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(foreign, 12345, 12345)
    else:  # not root: a folder we do not own is one level up anyway
        foreign = tmp_path.anchor
    with pytest.raises(StorageError, match=r"owned by uid \d+, not by you"):
        ShardCache(str(foreign), 1 << 20)
    fresh = ShardCache(str(tmp_path / "new" / "cache"), 1 << 20)
    assert (fresh.root.stat().st_mode & 0o777) == 0o700
    assert cache_mod.default_cache_dir().endswith(f"aem-dist-cache-{os.getuid()}")


def test_planted_entries_are_never_used(tmp_path):
    data = os.urandom(3000)
    url, sha, n = put("p.tar", data)
    c = ShardCache(str(tmp_path / "cache"), 1 << 20)
    entry = c.entry_path(sha)
    entry.parent.mkdir(parents=True)
    # 1) someone else's file with the right size and a marker of this boot
    entry.write_bytes(b"X" * n)
    entry.with_suffix(".ok").write_text(str(cache_mod.BOOT_ID))
    entry.chmod(0o666)
    with c.open(url, "p.tar", sha, n) as f:
        assert f.read() == data
    # 2) a symlink to a file outside the cache, of the right size
    outside = tmp_path / "outside.tar"
    outside.write_bytes(b"Y" * n)
    entry.unlink()
    entry.symlink_to(outside)
    with c.open(url, "p.tar", sha, n) as f:
        assert f.read() == data
    assert c.fills == 2 and outside.read_bytes() == b"Y" * n and not entry.is_symlink()


def test_eviction_never_follows_symlinks(tmp_path):
    outside = tmp_path / "outside"
    (outside / "ab").mkdir(parents=True)
    victims = [outside / "victim.tar", outside / "ab" / "victim.tar"]
    for v in victims:
        v.write_bytes(b"v" * 5000)
    c = ShardCache(str(tmp_path / "cache"), 1500)
    (c.root / "shards").mkdir()
    (c.root / "shards" / "zz").symlink_to(outside)  # a symlinked folder of "entries"
    (c.root / "shards" / "yy").mkdir()
    (c.root / "shards" / "yy" / "link.tar").symlink_to(victims[0])  # a symlinked "entry"
    for i in range(3):
        url, sha, n = put(f"e{i}.tar", os.urandom(1000))
        c.open(url, f"e{i}.tar", sha, n).close()
    assert all(v.read_bytes() == b"v" * 5000 for v in victims)
    assert c.usage() <= 1500
