"""Ingestion that keeps results honest: patients whole, dim by consensus, label typos refused, all problems at once."""

from __future__ import annotations

import csv
from collections import defaultdict

import h5py
import numpy as np
import pytest

from aem_dist.data.ingest import ingest
from aem_dist.data.schema import BadSampleError
from aem_dist.data.sources import SourceError

from .test_sources import DIM, slides, write_h5_folder, write_labels


def _patients_folder(tmp_path, n_patients=20):
    """Two slides per patient (CLAM's case_id,slide_id,label); the label is the patient's."""
    folder = tmp_path / "h5"
    folder.mkdir()
    rows = []
    for p in range(n_patients):
        for s in range(2):
            sid = f"p{p:02d}_s{s}"
            with h5py.File(folder / f"{sid}.h5", "w") as f:
                f["features"] = np.full((3, DIM), p + s / 10, np.float32)
            rows.append((f"patient_{p:02d}", sid, "tumor" if p % 2 else "normal"))
    return folder, rows


def _write(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return str(path)


def test_case_id_csv_keeps_every_patient_in_one_split(tmp_path):
    folder, rows = _patients_folder(tmp_path)
    labels = _write(tmp_path / "l.csv", ["case_id", "slide_id", "label"], rows)
    for seed in range(3):
        m = ingest("clam", str(folder), str(tmp_path / f"out{seed}"), labels_csv=labels, val_frac=0.2, test_frac=0.3, seed=seed, progress=False).manifest
        case_of = m.source["cases"]["case_of"]
        splits_of_case = defaultdict(set)
        for split, entry in m.splits.items():
            for bag in entry.bags():
                splits_of_case[case_of[bag.key]].add(split)
        assert len(splits_of_case) == 20 and all(len(s) == 1 for s in splits_of_case.values()), dict(splits_of_case)
        assert m.source["cases"]["column"] == "case_id" and sum(m.source["cases"]["n_cases"].values()) == 20
        for entry in m.splits.values():  # stratified at case level: both classes everywhere
            assert all(c > 0 for c in entry.class_counts)


def test_csv_splits_that_put_a_case_in_two_splits_name_it(tmp_path):
    folder, rows = _patients_folder(tmp_path, 4)
    split = {0: "train", 1: "test"}
    with_split = [(c, s, lab, split[i % 2] if c == "patient_01" else "train") for i, (c, s, lab) in enumerate(rows)]
    labels = _write(tmp_path / "l.csv", ["patient", "slide_id", "label", "split"], with_split)
    with pytest.raises(SourceError, match="case 'patient_01' in test/train"):
        ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=labels, case_column="patient", progress=False)


def test_first_slide_with_an_odd_dim_is_the_one_blamed(tmp_path):
    data = slides()
    folder = tmp_path / "h5"
    write_h5_folder(folder, data)
    with h5py.File(folder / "slide_00.h5", "r+") as f:  # slide_00 sorts first and is read first
        del f["features"]
        f["features"] = np.zeros((3, DIM + 1), np.float32)
    labels = write_labels(tmp_path / "l.csv", data)
    # slide_00 alone in train: the train split is written first, so it is certainly the first slide read
    first = _write(tmp_path / "first.csv", ["slide_id", "label", "split"], [(sid, lab, "train" if sid == "slide_00" else ["val", "test"][i % 2]) for i, (sid, (_, _, lab)) in enumerate(data.items())])
    with pytest.raises(BadSampleError, match=r"feature dim 7 != dataset dim 6 \(the dim of 11 of 12 slides\)") as info:
        ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=first, progress=False)
    assert info.value.key == "slide_00"
    kept = ingest("clam", str(folder), str(tmp_path / "out2"), labels_csv=labels, on_bad="skip", progress=False)
    assert kept.manifest.dim == DIM and sum(e.n_bags for e in kept.manifest.splits.values()) == 11
    assert dict(kept.skipped) == {"dim_mismatch": 1}


def test_label_case_and_whitespace_variants_are_refused_without_a_label_map(tmp_path):
    data = slides()
    data["slide_01"] = (*data["slide_01"][:2], "Tumor")
    data["slide_04"] = (*data["slide_04"][:2], "TUMOR")
    folder = tmp_path / "h5"
    write_h5_folder(folder, data)
    labels = write_labels(tmp_path / "l.csv", data)
    with pytest.raises(SourceError, match=r"'TUMOR' \(slides slide_04\), 'Tumor' \(slides slide_01\), 'tumor'"):
        ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=labels, progress=False)
    m = ingest("clam", str(folder), str(tmp_path / "out2"), labels_csv=labels, label_map={"Tumor": "tumor", "TUMOR": "tumor"}, progress=False).manifest
    assert m.class_names == ["normal", "other", "tumor"] and m.source["label_map"] == {"Tumor": "tumor", "TUMOR": "tumor"}


def test_on_bad_error_all_reports_every_problem_at_once(tmp_path):
    data = slides()
    folder = tmp_path / "h5"
    write_h5_folder(folder, data)
    for sid in ("slide_03", "slide_07"):
        with h5py.File(folder / f"{sid}.h5", "r+") as f:
            del f["features"]
            f["features"] = np.full((4, DIM), np.nan, np.float32)
    labels = write_labels(tmp_path / "l.csv", data)
    with pytest.raises(SourceError, match="2 bad slide") as info:
        ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=labels, report_all=True, progress=False)
    assert "slide_03" in str(info.value) and "slide_07" in str(info.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_verify_lists_every_problem_with_all_and_cannot_read_is_not_a_data_problem(tmp_path):
    from aem_dist.data.verify import ShardReport, VerifyReport, verify_dataset

    shard = ShardReport("train", "train-000000.tar", problems=[f"key 'b{i}': bad [non_finite]" for i in range(25)])
    report = VerifyReport("x", shards=[shard])
    assert "… and 5 more (--all shows every one)" in report.text() and "b24" not in report.text()
    assert "b24" in report.text(limit=None) and "more" not in report.text(limit=None)
    missing = verify_dataset(str(tmp_path / "nothing-here"), progress=False)
    assert not missing.readable and not missing.ok


def test_cv_folds_keep_every_patient_in_one_fold():
    from aem_dist.data.sources.labels import grouped_stratified_folds

    ids = [f"p{p:02d}_s{s}" for p in range(20) for s in range(3)]
    cases = [i.split("_")[0] for i in ids]
    y = [int(c[1:]) % 2 for c in cases]
    folds = grouped_stratified_folds(ids, y, cases, k=5, seed=0)
    by_case = defaultdict(set)
    for case, f in zip(cases, folds):
        by_case[case].add(f)
    assert all(len(f) == 1 for f in by_case.values()) and set(folds) == set(range(5))
    for f in range(5):  # stratified: both classes in every held-out fold
        assert {label for label, g in zip(y, folds) if g == f} == {0, 1}
    with pytest.raises(SourceError, match="at least 5 cases"):
        grouped_stratified_folds(ids[:6], y[:6], cases[:6], k=5, seed=0)
