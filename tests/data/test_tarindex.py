"""Header-only tar index used by the streaming loader: cut and corrupt archives are detected."""

from __future__ import annotations

import io

import pytest

from aem_dist.data.schema import BadSampleError
from aem_dist.data.shards import index_tar
from tests.data.helpers import members_of, tar_bytes, tiny_bag

BAGS = [tiny_bag(i) for i in range(3)]
FULL = tar_bytes([m for b in BAGS for m in members_of(b)])


def test_well_formed_archive_has_no_cut():
    index = index_tar(io.BytesIO(FULL), "s.tar")
    assert index.cut is None and sorted(index.members) == [b.key for b in BAGS]
    sample = index.read(io.BytesIO(FULL), BAGS[1].key)
    assert set(sample.members) == {"feats.npy", "coords.npy", "json"}


@pytest.mark.parametrize("where", ["member_boundary", "inside_header", "inside_data"])
def test_cut_archives(where):
    last = FULL.index(f"{BAGS[2].key}.feats.npy".encode())  # header of the last sample's first member
    cut = {"member_boundary": last, "inside_header": last + 100, "inside_data": last + 512 + 10}[where]
    data = FULL[:cut]
    index = index_tar(io.BytesIO(data), "s.tar")
    assert index.cut is not None and index.cut.reason == "truncated_tar"
    assert BAGS[0].key in index.members and BAGS[2].key not in index.members
    with pytest.raises(BadSampleError) as info:
        index.read(io.BytesIO(data), BAGS[2].key)
    assert info.value.reason == "truncated_tar" and info.value.shard == "s.tar" and info.value.key == BAGS[2].key


def test_garbage_after_members_is_corruption():
    data = FULL[: FULL.index(f"{BAGS[2].key}.feats.npy".encode())] + b"\x07" * 2048
    index = index_tar(io.BytesIO(data), "s.tar")
    assert index.cut is not None and index.cut.reason == "truncated_tar"


def test_unexpected_members_are_listed_never_read():
    data = tar_bytes(members_of(BAGS[0]) + [(f"{BAGS[0].key}.pyd", b"\x80\x04evil")])
    index = index_tar(io.BytesIO(data), "s.tar")
    assert index.unexpected == {BAGS[0].key: [f"{BAGS[0].key}.pyd"]}
    sample = index.read(io.BytesIO(data), BAGS[0].key)
    assert "pyd" not in sample.members and sample.unexpected == [f"{BAGS[0].key}.pyd"]
