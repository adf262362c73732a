import numpy as np

from aem_dist.data.synthetic import PRESETS, generate, get_spec, make_bag, unpack_mask, write_synthetic


def test_deterministic_per_seed():
    spec = get_spec("demo")
    a = [b for _, b in generate(spec, seed=3)][:5]
    b = [make_bag(spec, 3, "train", i) for i in range(5)]
    c = [b for _, b in generate(spec, seed=4)][:5]
    for x, y in zip(a, b):
        assert x.feats.tobytes() == y.feats.tobytes() and np.array_equal(x.coords, y.coords) and x.label == y.label
    assert any(x.feats.shape != z.feats.shape or x.feats.tobytes() != z.feats.tobytes() for x, z in zip(a, c))


def test_dataset_bytes_reproducible(tmp_path):
    m1 = write_synthetic(get_spec("demo", 0.25), str(tmp_path / "a"), seed=1, progress=False)
    m2 = write_synthetic(get_spec("demo", 0.25), str(tmp_path / "b"), seed=1, progress=False)
    assert [s.sha256 for s in m1.splits["train"].shards] == [s.sha256 for s in m2.splits["train"].shards]


def test_presets_match_their_statistics():
    for name in ("demo", "mil-small", "wsi-small", "wsi-c16"):
        spec = PRESETS[name]
        from aem_dist.data.synthetic import _world

        world = _world(spec, seed=0)
        sizes = np.concatenate(list(world.sizes.values()))
        assert abs(np.median(sizes) - spec.median_instances) <= 0.1 * spec.median_instances, name
        assert sizes.min() >= spec.min_instances and sizes.max() <= spec.max_instances
        weights = np.asarray(spec.class_weights or [1] * spec.n_classes, float)
        for split, labels in world.labels.items():
            counts = np.bincount(labels, minlength=spec.n_classes)
            expected = weights / weights.sum() * len(labels)
            assert np.all(np.abs(counts - expected) <= 1), (name, split, counts)
    assert PRESETS["wsi-small"].dim == 384 and PRESETS["wsi-c16"].dim == 384
    assert sum(PRESETS["wsi-c16"].n_bags.values()) == 400 and PRESETS["wsi-c16"].n_bags["test"] == 130


def test_size_scale_shrinks_bags_and_keeps_counts():
    import pytest

    from aem_dist.data.synthetic import _world

    spec = get_spec("wsi-c16", size_scale=0.125)
    base = PRESETS["wsi-c16"]
    assert (spec.median_instances, spec.min_instances, spec.max_instances) == (1000, 62, 6250)
    assert spec.n_bags == base.n_bags and spec.sigma == base.sigma and spec.decoy_count == base.decoy_count
    sizes = np.concatenate(list(_world(spec, seed=0).sizes.values()))
    assert abs(np.median(sizes) - 1000) <= 100 and sizes.min() >= 62 and sizes.max() <= 6250
    assert get_spec("wsi-c16", 0.5, 0.125).n_bags["test"] == 65
    with pytest.raises(ValueError, match="size_scale"):
        get_spec("wsi-c16", size_scale=0)


def test_bags_look_like_slides():
    spec = get_spec("demo")
    bags = [make_bag(spec, 0, "train", i) for i in range(16)]
    for b in bags:
        assert b.feats.dtype == np.float16 and b.coords.dtype == np.int32
        assert len({tuple(c) for c in b.coords}) == b.n  # one patch per grid cell
        assert np.all(b.coords % 256 == 0)
        tumour = unpack_mask(b.meta["tumour_mask_bits"], b.n)
        assert (tumour.sum() > 0) == (b.label >= 1)
        if b.label >= 1:  # tumour instances sit together on the grid
            pts = b.coords[tumour] / 256
            span = np.ptp(pts, axis=0).max()
            assert span <= np.ptp(b.coords / 256, axis=0).max()
    assert {b.label for b in bags} == {0, 1}
