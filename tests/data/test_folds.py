"""Cross-validation folds: recorded in the manifest, picked with data.fold, read by both loaders."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from aem_dist.config import ConfigError, load_config
from aem_dist.data.folds import fold_view, make_folds, record_folds
from aem_dist.data.manifest import load_manifest
from aem_dist.data.shards import write_dataset
from aem_dist.engine.dist import DistContext
from aem_dist.engine.loop import open_data

from .helpers import CLASSES, DIM, tiny_bag


def _dataset(root, n=23, shard_bytes=600):
    """n bags over train/val/test, several shards per split, labels unbalanced (about 1/3 positive)."""
    pairs = []
    for i in range(n):
        bag = tiny_bag(i, label=int(i % 3 == 0))
        pairs.append((("train", "train", "val", "test")[i % 4], bag))
    return write_dataset(str(root), pairs, DIM, CLASSES, shard_bytes=shard_bytes)


def test_every_bag_in_exactly_one_test_fold_and_stratified(tmp_path):
    m = _dataset(tmp_path)
    folds = make_folds(m, 5, val_frac=0.2, seed=3)
    keys = [b.key for e in m.splits.values() for b in e.bags()]
    label = {b.key: b.label for e in m.splits.values() for b in e.bags()}
    tested = Counter(k for f in folds.folds for k in f.test)
    assert set(tested) == set(keys) and set(tested.values()) == {1}
    for f in folds.folds:
        assert sorted(f.train + f.val + f.test) == sorted(keys)
        assert f.val, "val_frac 0.2 draws a validation share"
    # Stratified: each class's bags spread over the test folds within one bag of each other.
    for c in range(2):
        per_fold = [sum(1 for k in f.test if label[k] == c) for f in folds.folds]
        assert max(per_fold) - min(per_fold) <= 1, (c, per_fold)


def test_same_seed_same_folds_other_seed_differs(tmp_path):
    m = _dataset(tmp_path)
    assert make_folds(m, 4, seed=7) == make_folds(m, 4, seed=7)
    assert make_folds(m, 4, seed=7) != make_folds(m, 4, seed=8)


def test_a_patients_slides_stay_in_one_fold(tmp_path):
    # Cases as ingest records them: slide id -> case, in manifest.source.cases.case_of.
    pairs = [(("train", "val", "test")[i % 3], tiny_bag(i, label=int(i % 4 == 0))) for i in range(24)]
    case_of = {f"bag-{i:03d}": f"patient-{i // 3}" for i in range(24)}  # 8 patients x 3 slides
    write_dataset(str(tmp_path), pairs, DIM, CLASSES, shard_bytes=600, source={"cases": {"column": "case_id", "case_of": case_of}})
    m = record_folds(str(tmp_path), 4, val_frac=0.25, seed=0)
    assert m.folds is not None and m.folds.grouped_by == "case_id"
    for f in m.folds.folds:
        for split in ("train", "val", "test"):
            patients = {case_of[k] for k in getattr(f, split)}
            others = {case_of[k] for s2 in ("train", "val", "test") if s2 != split for k in getattr(f, s2)}
            assert not patients & others, (split, patients & others)


def test_record_keeps_fixed_splits_and_shards(tmp_path):
    m0 = _dataset(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")}
    m1 = record_folds(str(tmp_path), 3, seed=1)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.tar")} == before  # shards untouched
    assert m1.splits == m0.splits
    on_disk = load_manifest(str(tmp_path))
    assert on_disk.folds == m1.folds and json.loads((tmp_path / "manifest.json").read_text())["folds"]["k"] == 3
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind


def test_fold_errors_name_the_key(tmp_path):
    m = _dataset(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.fold=0: .*no cross-validation folds.*aem-dist splits"):
        fold_view(m, 0)
    m = record_folds(str(tmp_path), 3)
    with pytest.raises(ConfigError, match=r"data\.fold=3: .* has 3 folds \(0\.\.2\)"):
        fold_view(m, 3)
    cfg = load_config("demo", [f"data.root={tmp_path}", "data.fold=5", "train.progress=false"])
    with pytest.raises(ConfigError, match=r"data\.fold=5"):
        open_data(cfg, DistContext())


@pytest.mark.parametrize("loader", ["memory", "stream"])
def test_training_on_a_fold_reads_exactly_its_bags(tmp_path, loader):
    root = tmp_path / "data"
    _dataset(root)
    m = record_folds(str(root), 3, val_frac=0.2, seed=0)
    fold = m.folds.folds[1]
    cfg = load_config("demo", [f"data.root={root}", "data.fold=1", f"data.loader={loader}", f"data.cache_dir={tmp_path / 'cache'}", "train.progress=false"])
    data = open_data(cfg, DistContext())
    for split, got in (("train", data.train), ("val", data.val), ("test", data.test)):
        keys = sorted(k for batch in got.epoch(0) for k in batch.keys)
        if split == "train":
            keys = sorted(set(keys))  # training may repeat a bag to equalise steps; one rank here does not
        assert keys == sorted(getattr(fold, split)), split
        assert got.listed_bags == len(getattr(fold, split)) and not got.lost


def test_cli_splits(tmp_path):
    from typer.testing import CliRunner

    from aem_dist.cli import app

    _dataset(tmp_path)
    res = CliRunner().invoke(app, ["splits", str(tmp_path), "--folds", "4", "--val-frac", "0.2", "--seed", "2"])
    assert res.exit_code == 0, res.output
    assert "recorded 4 folds" in res.output and "fold 3: train" in res.output
    assert load_manifest(str(tmp_path)).folds.k == 4
    res = CliRunner().invoke(app, ["splits", str(tmp_path), "--folds", "40"])
    assert res.exit_code == 2 and "40 folds need at least 40 cases" in res.output


def test_synth_records_folds(tmp_path):
    from typer.testing import CliRunner

    from aem_dist.cli import app

    res = CliRunner().invoke(app, ["synth", "--preset", "demo", "--out", str(tmp_path), "--folds", "3", "--val-frac", "0.2", "--seed", "4"])
    assert res.exit_code == 0, res.output
    m = load_manifest(str(tmp_path))
    assert m.folds is not None and (m.folds.k, m.folds.seed, m.folds.val_frac) == (3, 4, 0.2)


def test_drivers_refuse_a_missing_fold_before_starting_workers(tmp_path):
    """`aem-dist train` and a sweep's plan name data.fold before any worker (or Ray) starts."""
    from aem_dist.config import config_with
    from aem_dist.orchestrate.plan import SweepPlan
    from aem_dist.orchestrate.train import train_run

    root = tmp_path / "data"
    _dataset(root)
    record_folds(str(root), 3)
    cfg = load_config("demo", [f"data.root={root}", "data.fold=4", "train.progress=false", "metrics.enabled=false", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match=r"data\.fold=4: .* has 3 folds"):
        train_run(cfg, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "run.json").exists()
    base = load_config("demo", [f"data.root={root}"])
    specs = SweepPlan.build(config_with(base, {"sweep.grid": {"data.fold": [0, 1, 2], "loss.lam": [0.0, 0.1]}})).populations
    assert sorted(m.values["data.fold"] for s in specs for m in s.members) == [0, 0, 1, 1, 2, 2]
    assert all(len({m.values["data.fold"] for m in s.members}) == 1 for s in specs)  # a population never mixes folds
    with pytest.raises(ConfigError, match=r"data\.fold=3: .* has 3 folds"):
        SweepPlan.build(config_with(base, {"sweep.grid": {"data.fold": [0, 3]}})).populations


def test_ingest_with_case_column_records_folds_that_keep_patients_whole(tmp_path):
    """`aem-dist ingest --folds K` on a CLAM folder whose CSV groups slides by case_id."""
    from typer.testing import CliRunner

    from aem_dist.cli import app

    from .test_ingest_trust import _patients_folder, _write

    folder, rows = _patients_folder(tmp_path, n_patients=10)
    labels = _write(tmp_path / "l.csv", ["case_id", "slide_id", "label"], rows)
    out = tmp_path / "ds"
    res = CliRunner().invoke(app, ["ingest", "--format", "clam", "--src", str(folder), "--labels", labels, "--out", str(out), "--folds", "5", "--val-frac", "0.2"])
    assert res.exit_code == 0, res.output
    m = load_manifest(str(out))
    case_of = {slide: case for case, slide, _ in rows}
    assert m.folds is not None and m.folds.grouped_by == "case_id"
    for i, f in enumerate(m.folds.folds):
        test_cases = {case_of[k] for k in f.test}
        assert len(test_cases) == 2 and len(f.test) == 4, i  # 10 patients / 5 folds, both slides of each
        assert not test_cases & {case_of[k] for k in f.train + f.val}
