"""An HDF5 input never reads outside itself: a features dataset with external storage (raw bytes of
another file), an external link, a soft link into an external link, or a virtual dataset is refused
by name, and no byte of the outside file reaches a shard (before: ingested with exit 0)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from aem_dist.data.ingest import ingest
from aem_dist.data.sources import SourceError

N, D = 6, 4
OUTSIDE = np.full((N, D), 1234.5, np.float32)  # what the outside files hold: valid features, so only the refusal stops them
MARK = np.full(D, 1234.5, np.float16).tobytes()  # how they would look in a shard


def outside(tmp_path: Path) -> tuple[Path, Path]:
    """A raw file and an h5 file outside --src, both holding OUTSIDE."""
    raw = tmp_path / "secret.bin"
    raw.write_bytes(OUTSIDE.tobytes())
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["features"] = OUTSIDE
    return raw, other


def make(kind: str, path: Path, raw: Path, other: Path) -> None:
    with h5py.File(path, "w") as f:
        if kind == "external_storage":
            f.create_dataset("features", shape=(N, D), dtype="f4", external=[(str(raw), 0, N * D * 4)])
        elif kind == "external_link":
            f["features"] = h5py.ExternalLink(str(other), "/features")
        elif kind == "soft_link":
            f["ext"] = h5py.ExternalLink(str(other), "/")
            f["features"] = h5py.SoftLink("/ext/features")
        elif kind == "virtual":
            layout = h5py.VirtualLayout(shape=(N, D), dtype="f4")
            layout[:] = h5py.VirtualSource(str(other), "features", shape=(N, D))
            f.create_virtual_dataset("features", layout)
        f["coords"] = np.zeros((N, 2), np.int32)


@pytest.mark.parametrize("kind, says", [("external_storage", "external storage"), ("external_link", "external link"),
                                        ("soft_link", "resolves into another file"), ("virtual", "virtual dataset")])
def test_h5_indirection_is_refused_by_name(tmp_path, kind, says):
    raw, other = outside(tmp_path)
    src = tmp_path / "src"
    src.mkdir()
    make(kind, src / "slide-0.h5", raw, other)
    for i in (1, 2, 3):  # good slides beside it
        with h5py.File(src / f"slide-{i}.h5", "w") as f:
            f["features"] = np.full((N, D), i, np.float32)
            f["coords"] = np.zeros((N, 2), np.int32)
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\n" + "".join(f"slide-{i},{'ab'[i % 2]}\n" for i in range(4)))
    with pytest.raises(SourceError, match=f"slide-0.h5: 'features' .*{says}"):
        ingest("clam", str(src), str(tmp_path / "out"), labels_csv=str(labels), progress=False)
    written = b"".join(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert MARK not in written and not (tmp_path / "out" / "manifest.json").exists()


def test_acmil_slide_group_through_an_external_link_is_refused(tmp_path):
    raw, other = outside(tmp_path)
    with h5py.File(tmp_path / "grp.h5", "w") as f:
        g = f.create_group("slide-x")
        g["feat"] = OUTSIDE
        g.attrs["label"] = 1
    path = tmp_path / "all.h5"
    with h5py.File(path, "w") as f:
        for i in range(4):
            g = f.create_group(f"slide-{i}")
            g["feat"] = np.full((N, D), i, np.float32)
            g.attrs["label"] = i % 2
        f["slide-x"] = h5py.ExternalLink(str(tmp_path / "grp.h5"), "/slide-x")
    with pytest.raises(SourceError, match="'slide-x' is an HDF5 external link"):
        ingest("acmil", str(path), str(tmp_path / "out"), val_frac=0.25, test_frac=0.25, progress=False)
