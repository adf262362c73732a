"""Ingestion round trips: every input format, from small files written here, back out bit-for-bit (fp16)."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from aem_dist.data.ingest import ingest
from aem_dist.data.loader import read_split
from aem_dist.data.manifest import load_manifest
from aem_dist.data.schema import BadSampleError
from aem_dist.data.sources import SourceError
from aem_dist.data.sources.labels import class_names_for, read_labels, stratified_split

DIM = 6
N_SLIDES = 12


def slides() -> dict[str, tuple[np.ndarray, np.ndarray, str]]:
    """slide id → (features (N, D) float32 exact in fp16, coords (N, 2), class name)."""
    out = {}
    for i in range(N_SLIDES):
        n = 3 + i % 5
        feats = (np.arange(n * DIM, dtype=np.float32).reshape(n, DIM) / 8 + i).astype(np.float32)
        coords = np.stack([np.arange(n) * 256, np.full(n, i * 256)], axis=1).astype(np.int64)
        out[f"slide_{i:02d}"] = (feats, coords, ["normal", "tumor", "other"][i % 3])
    return out


def write_labels(path: Path, data, *, with_split: bool = False, suffix: str = "") -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "label"] + (["split"] if with_split else []))
        for i, (sid, (_, _, label)) in enumerate(data.items()):
            w.writerow([sid + suffix, label] + ([["train", "val", "test"][i % 3]] if with_split else []))
    return str(path)


def check_roundtrip(out: str, data, *, with_coords: bool = True, names=("normal", "other", "tumor")) -> None:
    m = load_manifest(out)
    assert m.dim == DIM and m.class_names == list(names)
    assert sum(e.n_bags for e in m.splits.values()) == len(data)
    for split in m.splits:
        for bag in read_split(out, m, split):
            feats, coords, label = data[bag.slide_id]
            np.testing.assert_array_equal(bag.feats, feats.astype(np.float16))
            assert m.class_names[bag.label] == label
            if with_coords:
                np.testing.assert_array_equal(bag.coords, coords)
            else:
                assert bag.coords is None


def write_h5_folder(folder: Path, data, leading_axis: bool = False) -> None:
    folder.mkdir()
    for sid, (feats, coords, _) in data.items():
        with h5py.File(folder / f"{sid}.h5", "w") as f:
            f["features"] = feats[None] if leading_axis else feats
            f["coords"] = coords


@pytest.mark.parametrize("fmt", ["clam", "trident"])
def test_h5_folder(tmp_path, fmt):
    data = slides()
    write_h5_folder(tmp_path / "h5", data, leading_axis=fmt == "trident")
    labels = write_labels(tmp_path / "labels.csv", data, suffix=".svs" if fmt == "clam" else "")  # CLAM CSVs often keep the extension
    result = ingest(fmt, str(tmp_path / "h5"), str(tmp_path / "out"), labels_csv=labels, progress=False)
    check_roundtrip(str(tmp_path / "out"), data)
    assert result.manifest.source["format"] == fmt and not result.skipped


def test_pt_folder_weights_only(tmp_path):
    data = slides()
    folder = tmp_path / "pt"
    folder.mkdir()
    for i, (sid, (feats, coords, _)) in enumerate(data.items()):
        obj = torch.from_numpy(feats) if i % 2 else {"features": torch.from_numpy(feats), "coords": torch.from_numpy(coords)}
        torch.save(obj, folder / f"{sid}.pt")
    ingest("pt", str(folder), str(tmp_path / "out"), labels_csv=write_labels(tmp_path / "l.csv", data), progress=False)
    m = load_manifest(str(tmp_path / "out"))
    bags = {b.slide_id: b for s in m.splits for b in read_split(str(tmp_path / "out"), m, s)}
    for sid, (feats, _, _) in data.items():
        np.testing.assert_array_equal(bags[sid].feats, feats.astype(np.float16))


def test_pt_with_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    folder = tmp_path / "pt"
    folder.mkdir()
    torch.save({"features": torch.zeros(2, DIM), "x": Evil()}, folder / "s1.pt")
    torch.save(torch.ones(2, DIM), folder / "s2.pt")
    labels = tmp_path / "l.csv"
    labels.write_text("slide_id,label\ns1,a\ns2,b\n")
    with pytest.raises(SourceError, match="weights_only"):
        ingest("pt", str(folder), str(tmp_path / "out"), labels_csv=str(labels), progress=False)
    assert not (tmp_path / "pwned").exists()


def test_acmil_single_h5_labels_from_attrs(tmp_path):
    data = slides()
    path = tmp_path / "feats.h5"
    with h5py.File(path, "w") as f:
        for sid, (feats, coords, label) in data.items():
            g = f.create_group(sid)
            g["feat"] = feats
            g["coords"] = coords
            g.attrs["label"] = label
    result = ingest("acmil", str(path), str(tmp_path / "out"), val_frac=0.25, test_frac=0.25, seed=3, progress=False)
    check_roundtrip(str(tmp_path / "out"), data)
    m = result.manifest
    # Stratified: every split holds every class (12 slides, 3 classes, 1/4 fractions).
    assert all(all(c > 0 for c in e.class_counts) for e in m.splits.values())
    again = ingest("acmil", str(path), str(tmp_path / "out2"), val_frac=0.25, test_frac=0.25, seed=3, progress=False).manifest
    assert [s.sha256 for e in again.splits.values() for s in e.shards] == [s.sha256 for e in m.splits.values() for s in e.shards]


def test_zarr_store(tmp_path):
    import zarr

    data = slides()
    root = zarr.open_group(str(tmp_path / "bags.zarr"), mode="w")
    for sid, (feats, coords, label) in data.items():
        g = root.create_group(sid)
        g.create_array("features", data=feats)
        g.create_array("coords", data=coords)
        g.attrs["label"] = label
    labels = write_labels(tmp_path / "l.csv", data, with_split=True)
    result = ingest("zarr", str(tmp_path / "bags.zarr"), str(tmp_path / "out"), labels_csv=labels, progress=False)
    check_roundtrip(str(tmp_path / "out"), data)
    assert {s: e.n_bags for s, e in result.manifest.splits.items()} == {"train": 4, "val": 4, "test": 4}  # from the CSV


def test_mil_csv_musk_layout(tmp_path):
    data = {sid: (feats, None, label) for sid, (feats, _, label) in slides().items()}
    path = tmp_path / "musk.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "bag"] + [f"f{j}" for j in range(DIM)])
        for sid, (feats, _, label) in data.items():
            code = {"normal": -1, "other": 0, "tumor": 1}[label]  # numeric labels, Elephant-style -1/+1
            for row in feats:
                w.writerow([code, sid] + [repr(float(x)) for x in row])
    result = ingest("mil-csv", str(path), str(tmp_path / "out"), progress=False)
    assert result.manifest.class_names == ["-1", "0", "1"]  # integers sort numerically
    renamed = {sid: (f, c, {"normal": "-1", "other": "0", "tumor": "1"}[lab]) for sid, (f, c, lab) in data.items()}
    check_roundtrip(str(tmp_path / "out"), renamed, with_coords=False, names=("-1", "0", "1"))


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bad_source_bags(tmp_path, policy):
    data = slides()
    folder = tmp_path / "h5"
    write_h5_folder(folder, data)
    with h5py.File(folder / "slide_03.h5", "r+") as f:
        del f["features"]
        f["features"] = np.full((4, DIM), np.nan, np.float32)
    with h5py.File(folder / "slide_05.h5", "r+") as f:
        del f["features"], f["coords"]
        f["features"] = np.zeros((0, DIM), np.float32)
        f["coords"] = np.zeros((0, 2), np.int64)
    labels = write_labels(tmp_path / "l.csv", {**data, "slide_99": data["slide_00"]})  # one without features
    if policy == "error":
        with pytest.raises(BadSampleError) as info:
            ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=labels, progress=False)
        assert info.value.key in ("slide_99", "slide_03", "slide_05")
        assert not (tmp_path / "out" / "manifest.json").exists()
    else:
        result = ingest("clam", str(folder), str(tmp_path / "out"), labels_csv=labels, on_bad="skip", progress=False)
        assert dict(result.skipped) == {"missing_features": 1, "non_finite": 1, "empty_bag": 1}
        assert sum(e.n_bags for e in result.manifest.splits.values()) == N_SLIDES - 2
        assert result.manifest.source["skipped"] == dict(result.skipped)


def test_labels_csv_and_class_names(tmp_path):
    p = tmp_path / "l.csv"
    p.write_text("slide_id,label,split\na,tumor,train\nb,normal,validation\nc,tumor,test\n")
    rows = read_labels(str(p))
    assert [(r.slide_id, r.label, r.split) for r in rows] == [("a", "tumor", "train"), ("b", "normal", "val"), ("c", "tumor", "test")]
    assert class_names_for(["tumor", "normal"]) == (["normal", "tumor"], {"normal": 0, "tumor": 1})
    assert class_names_for(["1", "0"], ["neg", "pos"])[1] == {"0": 0, "1": 1, "neg": 0, "pos": 1}
    with pytest.raises(SourceError, match="not one of the classes"):
        class_names_for(["x"], ["neg", "pos"])
    p.write_text("slide_id,label\na,1\na,0\n")
    with pytest.raises(SourceError, match="listed twice"):
        read_labels(str(p))
    ids = [f"s{i}" for i in range(40)]
    y = [i % 2 for i in range(40)]
    split = stratified_split(ids, y, val_frac=0.1, test_frac=0.2, seed=0)
    assert Counter(split.values()) == {"train": 28, "val": 4, "test": 8}
    assert split == stratified_split(ids, y, val_frac=0.1, test_frac=0.2, seed=0)
    assert split != stratified_split(ids, y, val_frac=0.1, test_frac=0.2, seed=1)





def test_slides_without_coords_are_a_named_warning_counted_in_the_manifest(tmp_path, caplog):
    data = slides()
    write_h5_folder(tmp_path / "h5", data)
    for sid in ("slide_03", "slide_07"):  # TRIDENT/CLAM files without their coords dataset
        with h5py.File(tmp_path / "h5" / f"{sid}.h5", "a") as f:
            del f["coords"]
    with caplog.at_level("WARNING", logger="aem_dist.data.ingest"):
        result = ingest("clam", str(tmp_path / "h5"), str(tmp_path / "out"), labels_csv=write_labels(tmp_path / "l.csv", data), progress=False)
    assert result.manifest.source["missing_coords"] == 2 and load_manifest(str(tmp_path / "out")).source["missing_coords"] == 2
    (warning,) = [r.getMessage() for r in caplog.records if "no patch coordinates" in r.getMessage()]
    assert "2 of 12 slide(s)" in warning and "'slide_03'" in warning and "'slide_07'" in warning
