"""The streaming loader applies the memory loader's file checks to local shards: a shard name that
resolves to /dev/zero, a fifo or a folder is refused at once (before: spun, blocked forever even under
`skip`, or a traceback), and a shard changed in place with its size and mtime put back is hashed again
(before: it trained under the stream loader)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest

from aem_dist.data.cache import ShardCache
from aem_dist.data.schema import BadSampleError
from tests.data.helpers import write_tiny


@pytest.mark.parametrize("kind", ["dev_zero", "fifo", "folder"])
def test_special_files_are_refused_by_the_cache(tmp_path, kind):
    path = tmp_path / "train-000000.tar"
    if kind == "dev_zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    with pytest.raises(BadSampleError, match="not a regular file") as info:
        ShardCache(str(tmp_path / "cache"), 1 << 20).open(str(path), path.name, "0" * 64, 1000)
    assert info.value.reason == "not_regular_file" and info.value.shard == path.name


def test_stream_loader_under_skip_passes_over_a_fifo_shard(tmp_path):
    """The whole stream loader, in a fresh process under a hard bound: a fifo shard used to block it for ever."""
    root = tmp_path / "ds"
    write_tiny(str(root), n_train=12, n_val=5)
    victim = root / "train-000000.tar"
    victim.unlink()
    os.mkfifo(victim)
    code = textwrap.dedent(f"""
        from aem_dist.config import DataConfig
        from aem_dist.data.loader import LoaderSpec
        from aem_dist.data.manifest import load_manifest
        from aem_dist.data.registry import open_split
        cfg = DataConfig(root={str(root)!r}, loader="stream", cache_dir={str(tmp_path / 'cache')!r}, on_bad_sample="skip")
        m = load_manifest(cfg.root)
        loader = open_split(cfg, m, LoaderSpec("train", 0, 1, False, max_bags=2, on_bad_sample="skip"))
        bags = sum(b.n_bags for b in loader.epoch(0))
        print("BAGS", bags, "OF", m.splits["train"].n_bags, dict(loader.skipped))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = proc.stdout.split("BAGS", 1)[1].split()
    assert 0 < int(got[0]) < int(got[2]) and "not_regular_file" in proc.stdout


def test_shard_changed_in_place_with_size_and_mtime_restored_is_hashed_again(tmp_path):
    p = tmp_path / "local.tar"
    p.write_bytes(b"abc" * 100)
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    cache = ShardCache(str(tmp_path / "cache"), 1 << 20)
    cache.open(str(p), "local.tar", sha, 300).close()
    st = os.stat(p)
    with open(p, "r+b") as f:  # same size, then the old mtime put back
        f.seek(10)
        f.write(b"X")
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(p).st_size == st.st_size and os.stat(p).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(BadSampleError, match="sha256"):
        cache.open(str(p), "local.tar", sha, 300)
