"""An attention store's declared shapes are checked before anything is read from it (before: a zarr
shape of 2e9 made `heatmap` allocate 15 GiB)."""

from __future__ import annotations

import numpy as np
import pytest

from aem_dist.observe.attention import AttentionStore, AttentionStoreError, BagResult, write_attention
from aem_dist.observe.heatmap import render_store


def test_a_store_declaring_2e9_instances_is_refused_in_one_line(tmp_path):
    import zarr

    out = tmp_path / "att.zarr"
    bags = [BagResult(f"s{i}", f"s{i}", "test", 0, np.array([0.5, 0.5]), np.full(4, 0.25), np.arange(8, dtype=np.int32).reshape(4, 2)) for i in range(2)]
    write_attention(str(out), bags, class_names=["a", "b"])
    assert len(AttentionStore(str(out))) == 2
    g = zarr.open_group(str(out), mode="r+")
    g["offsets"][...] = np.array([0, 4, 2_000_000_000])  # what the forged metadata says
    g["attention"].resize((2_000_000_000,))
    g["coords"].resize((2_000_000_000, 2))
    with pytest.raises(AttentionStoreError, match=r"'offsets' do not describe bags of 0 … 1,000,000 instances each"):
        AttentionStore(str(out))
    with pytest.raises(AttentionStoreError):
        render_store(str(out), str(tmp_path / "heat"), progress=False)
    g["offsets"][...] = np.array([0, 4, 8])
    with pytest.raises(AttentionStoreError, match=r"'attention' declares 2,000,000,000 rows, the offsets 8"):
        AttentionStore(str(out))
