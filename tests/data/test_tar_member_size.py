"""A tar member's declared size is checked against the bytes left in the shard before it is read or
skipped: a 12 KB shard whose member header says 2^60 bytes (base-256 size field), with the manifest's
bytes and sha256 fixed to match, used to keep verify and the memory loader reading for ever."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from aem_dist.data.loader import SkipCounter, read_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.schema import BadSampleError
from aem_dist.data.shards import index_tar, read_shard
from tests.data.helpers import DIM, bag_row, members_of, tar_bytes, tiny_bag, write_raw_dataset

DECLARED = 1 << 60


def huge_member_shard(declared: int = DECLARED) -> tuple[bytes, list]:
    """One good bag, then a member whose header declares ``declared`` bytes in base-256 notation."""
    bag = tiny_bag(0)
    full = tar_bytes(members_of(bag))
    last = list(tarfile.open(fileobj=io.BytesIO(full)))[-1]
    good = full[: last.offset_data + -(-last.size // 512) * 512]
    header = bytearray(tarfile.TarInfo("bag-001.extra").tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"\x80" + declared.to_bytes(11, "big")  # GNU base-256 size field
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header[:512])
    return good + bytes(header[:512]) + b"\0" * 10240, [bag_row(bag), ("bag-001", 1, 3)]


def test_huge_declared_member_fails_fast_in_verify_and_memory_loader(tmp_path):
    data, rows = huge_member_shard()
    assert len(data) < 16 * 1024
    root = str(tmp_path / "ds")
    write_raw_dataset(root, [(data, rows)])
    with pytest.raises(BadSampleError, match=r"declares 1,152,921,504,606,846,976 bytes but only 10,240 remain.*\[truncated_tar\]"):
        list(read_shard(f"{root}/train-000000.tar", dim=DIM, n_classes=2))
    skipped = SkipCounter("skip")
    bags = read_split(root, load_manifest(root), "train", on_bad=skipped)  # the in-memory loader's reader
    assert [b.key for b in bags] == ["bag-000"] and skipped.counts["truncated_tar"] == 1
    assert index_tar(io.BytesIO(data), "s.tar").cut is None or "bag-001" not in index_tar(io.BytesIO(data), "s.tar").members
    # verify in a fresh process under a hard bound (before the fix it never ended; now ~0.1 s).
    code = f"from aem_dist.data.verify import verify_dataset; print(verify_dataset({root!r}, progress=False).text())"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "declares 1,152,921,504,606,846,976 bytes" in run.stdout and "PROBLEMS FOUND" in run.stdout
