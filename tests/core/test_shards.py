import json
import os
import tarfile

import numpy as np
import pytest

from aem_dist.data.loader import read_split
from aem_dist.data.manifest import ManifestError, load_manifest
from aem_dist.data.schema import Bag, safe_key
from aem_dist.data.shards import DatasetWriter, sha256_of, write_dataset


def _bag(slide_id, n, dim=5, label=0, seed=0, coords=True):
    rng = np.random.default_rng(seed)
    return Bag(
        slide_id=slide_id,
        feats=rng.standard_normal((n, dim)).astype(np.float16),
        label=label,
        coords=rng.integers(0, 10_000, size=(n, 2)).astype(np.int32) if coords else None,
        meta={"site": "A"},
    )


def test_round_trip_is_lossless(tmp_path):
    ids = ["slide.001.svs", "hospital/a/slide-2", "plain_id", "a.b", "a_b"]
    bags = [_bag(s, n=i + 1, label=i % 3, seed=i, coords=i != 2) for i, s in enumerate(ids)]
    manifest = write_dataset(str(tmp_path), [("train", b) for b in bags[:3]] + [("test", b) for b in bags[3:]], dim=5, class_names=["a", "b", "c"], shard_bytes=2_000)
    assert len({b.key for b in bags}) == len(bags)  # 'a.b' and 'a_b' do not collide
    back = {b.slide_id: b for split in ("train", "test") for b in read_split(str(tmp_path), manifest, split)}
    assert set(back) == set(ids)
    for b in bags:
        got = back[b.slide_id]
        assert got.feats.dtype == np.float16 and got.feats.tobytes() == b.feats.tobytes()
        assert got.label == b.label
        assert (got.coords is None) == (b.coords is None)
        if b.coords is not None:
            assert got.coords.dtype == np.int32 and np.array_equal(got.coords, b.coords)
        assert got.meta == {"site": "A"}


def test_manifest_counts_and_hashes(tmp_path):
    bags = [_bag(f"s{i}", n=10 + i, label=i % 2, seed=i) for i in range(7)]
    manifest = write_dataset(str(tmp_path), [("train", b) for b in bags], dim=5, class_names=["neg", "pos"], shard_bytes=1_500)
    split = manifest.splits["train"]
    assert len(split.shards) > 1
    assert split.n_bags == 7 and split.n_instances == sum(b.n for b in bags)
    assert split.class_counts == [4, 3]
    for shard in split.shards:
        digest, size = sha256_of(str(tmp_path / shard.name))
        assert (digest, size) == (shard.sha256, shard.bytes)
        with tarfile.open(tmp_path / shard.name) as tar:
            assert len(tar.getnames()) == 3 * shard.n_bags
    assert load_manifest(str(tmp_path)) == manifest


def test_same_bags_same_bytes(tmp_path):
    bags = [_bag(f"s{i}", n=5, seed=i) for i in range(3)]
    a = write_dataset(str(tmp_path / "a"), [("train", b) for b in bags], dim=5, class_names=["x", "y"])
    b = write_dataset(str(tmp_path / "b"), [("train", b) for b in bags], dim=5, class_names=["x", "y"])
    assert a.splits["train"].shards[0].sha256 == b.splits["train"].shards[0].sha256


def test_interrupted_write_leaves_no_manifest(tmp_path):
    with pytest.raises(RuntimeError, match="disk on fire"):
        with DatasetWriter(str(tmp_path), dim=5, class_names=["x", "y"], shard_bytes=1_000) as w:
            for i in range(5):
                w.add("train", _bag(f"s{i}", n=20, seed=i))
            raise RuntimeError("disk on fire")
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]
    with pytest.raises(ManifestError, match="no manifest"):
        load_manifest(str(tmp_path))


def test_writer_rejects_bad_bags(tmp_path):
    with DatasetWriter(str(tmp_path), dim=5, class_names=["x", "y"]) as w:
        w.add("train", _bag("dup", n=3))
        with pytest.raises(ValueError, match="duplicate bag key"):
            w.add("train", _bag("dup", n=3))
        with pytest.raises(ValueError, match="dim 4"):
            w.add("train", _bag("d4", n=3, dim=4))
        with pytest.raises(ValueError, match="label 7"):
            w.add("train", _bag("l7", n=3, label=7))


def test_manifest_validation_names_the_field(tmp_path):
    write_dataset(str(tmp_path), [("train", _bag("s", n=3))], dim=5, class_names=["x", "y"])
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["splits"]["train"]["shards"][0]["n_bags"] = 2
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="n_bags 2 != 1"):
        load_manifest(str(tmp_path))


def test_safe_key():
    assert safe_key("abc-1_2") == "abc-1_2"
    for raw in ("a.b", "x/y", "with space", "ünï"):
        k = safe_key(raw)
        assert all(c.isalnum() and c.isascii() or c in "_-" for c in k)
    assert safe_key("a.b") != safe_key("a_b")
