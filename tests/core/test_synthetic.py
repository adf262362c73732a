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


# --- the heterogeneous tumour model (wsi-c16, c16-mini) ---------------------------------------------

import hashlib  # noqa: E402
import json  # noqa: E402

import pytest  # noqa: E402

from aem_dist.data.synthetic import MIMIC, _make, parse_knobs, with_knobs  # noqa: E402

# Digests of the first generator's bags (measured on main before the heterogeneous model existed):
# the legacy presets must stay bit for bit what they were.
LEGACY_DIGESTS = {"demo": "7eaa11f78b683538", "mil-small": "2af3b36b5449dd8c", "wsi-small": "fb79195fae6d3c40"}


def test_legacy_presets_are_unchanged_bit_for_bit():
    for name, digest in LEGACY_DIGESTS.items():
        spec, h = get_spec(name, 0.1, 0.1), hashlib.sha256()
        for i in range(3):
            b = make_bag(spec, 0, "train", i)
            h.update(b.feats.tobytes())
            h.update(b.coords.tobytes())
            h.update(bytes([b.label]))
        assert h.hexdigest()[:16] == digest, name


def test_heterogeneous_bags_are_reproducible_per_bag():
    spec = get_spec("c16-mini")
    for split, i in (("train", 0), ("test", 5), ("val", 3)):
        a, b = make_bag(spec, 7, split, i), make_bag(spec, 7, split, i)
        assert a.feats.tobytes() == b.feats.tobytes() and a.meta == b.meta
    streamed = {(s, b.slide_id): b for s, b in generate(spec, 7)}
    alone = make_bag(spec, 7, "test", 5)
    assert streamed[("test", alone.slide_id)].feats.tobytes() == alone.feats.tobytes()


def test_tumour_is_heterogeneous_and_mimics_are_normal_tissue():
    spec = get_spec("c16-mini")
    kinds, labels, per_slide = [], [], []
    for i in range(spec.n_bags["train"]):
        bag, kind = _make(spec, 0, "train", i)
        kinds.append(kind)
        labels.append(bag.label)
        tumour = unpack_mask(bag.meta["tumour_mask_bits"], bag.n)
        mimic = unpack_mask(bag.meta["mimic_mask_bits"], bag.n)
        assert np.array_equal(tumour, kind > 0) and np.array_equal(mimic, kind == MIMIC) and not (tumour & mimic).any()
        assert bag.meta["subtype_instances"] == [int((kind == s + 1).sum()) for s in range(2)]
        if bag.label:
            assert tumour.sum() >= spec.min_tumour_instances
            per_slide.append(bag.meta["subtype_instances"][0] / tumour.sum())
        if mimic.any():
            assert spec.mimic_count[0] <= mimic.sum() <= spec.mimic_count[1]
    # slides differ in their sub-prototype mix; some slides carry mimics, normal ones included
    assert min(per_slide) < 0.2 and max(per_slide) > 0.8
    with_mimic = [lab for lab, k in zip(labels, kinds) if (k == MIMIC).any()]
    assert 0 in with_mimic and 0.1 < len(with_mimic) / len(labels) < 0.45


def test_mimic_rate_levels_are_nested():
    """Raising mimic_rate only adds mimic clusters: every other instance, label and tumour stays the same,
    so knob levels compare the same slides."""
    low, high = with_knobs(get_spec("c16-mini"), {"mimic_rate": 0.0}), with_knobs(get_spec("c16-mini"), {"mimic_rate": 0.5})
    added = 0
    for i in range(40):
        a, ka = _make(low, 0, "test", i)
        b, kb = _make(high, 0, "test", i)
        assert a.label == b.label and a.meta["tumour_mask_bits"] == b.meta["tumour_mask_bits"] and not (ka == MIMIC).any()
        same = kb != MIMIC
        assert np.array_equal(a.feats[same], b.feats[same])
        added += int((~same).any())
    assert 10 <= added <= 30


@pytest.mark.parametrize("key, value, why", [
    ("mimic_rate", 1.5, "probability"), ("mimic_rate", "x", "probability"), ("subtype_strength", (6.0, -1.0), "> 0"),
    ("subtype_weight", (1.0,), "one per subtype_strength"), ("tumour_frac", (0.3, 0.1), "lo ≤ hi"), ("mimic_count", (0, 3), "1 ≤ lo"),
    ("min_tumour_instances", 0, "≥ 1"), ("strength_jitter", 1.0, "[0, 1)"), ("subtype_concentration", 0, "> 0"), ("dim", 2.5, "integer"),
    ("class_weights", (1.0,), "2 weights"), ("decoy_rate_test", -0.1, "probability"),
])
def test_bad_knob_values_name_the_key(key, value, why):
    with pytest.raises(ValueError, match=f"synthetic spec: {key} .*{__import__('re').escape(why)}"):
        with_knobs(get_spec("wsi-c16"), {key: value})


def test_knob_overrides_parse_and_unknown_keys_are_named():
    assert parse_knobs(["mimic_rate=0.5", "subtype_strength=[6, 2]"]) == {"mimic_rate": 0.5, "subtype_strength": (6, 2)}
    with pytest.raises(ValueError, match="unknown knob 'mimic_rat'"):
        parse_knobs(["mimic_rat=0.5"])
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        parse_knobs(["mimic_rate"])
    with pytest.raises(ValueError, match="mimic_rate .*needs the heterogeneous"):
        get_spec("demo", knobs={"mimic_rate": 0.2})


def test_manifest_records_knobs_and_the_instance_probe(tmp_path):
    from typer.testing import CliRunner

    from aem_dist.cli import app

    out = tmp_path / "mini"
    result = CliRunner().invoke(app, ["synth", "--preset", "c16-mini", "--out", str(out), "--set", "mimic_rate=0.5", "--set", "subtype_strength=[6, 2]"])
    assert result.exit_code == 0, result.output
    assert "instance-level linear probe" in result.output
    source = json.loads((out / "manifest.json").read_text())["source"]
    assert source["knobs"] == {"mimic_rate": 0.5, "subtype_strength": [6, 2]}
    assert source["spec"]["mimic_rate"] == 0.5 and source["spec"]["subtype_strength"] == [6, 2] and source["spec"]["min_tumour_instances"] == 3
    probe = source["probe"]
    # tumour is separable instance by instance; the weaker sub-prototype less so; mimics look like tumour
    assert probe["auc"] > 0.85 and probe["auc_by_subtype"][0] > probe["auc_by_subtype"][1] and probe["mimic_auc"] > 0.8
    bad = CliRunner().invoke(app, ["synth", "--preset", "c16-mini", "--out", str(tmp_path / "bad"), "--set", "mimic_rate=2"])
    assert bad.exit_code != 0 and "mimic_rate" in bad.output and not (tmp_path / "bad").exists()
