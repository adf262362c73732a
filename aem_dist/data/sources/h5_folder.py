"""CLAM / TRIDENT feature folders: one ``<slide>.h5`` per slide with ``features`` (N, D) and ``coords`` (N, 2).

TRIDENT writes the same two datasets (sometimes ``features`` as (1, N, D)); labels come from the
labels CSV.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from . import RawBag, SourceError, as_matrix

FEATURE_KEYS = ("features", "feats", "feat")


class H5FolderSource:
    def __init__(self, folder: str, fmt: str = "clam"):
        self.fmt = fmt
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"{folder}: not a folder of <slide>.h5 files")
        self._files = {p.stem: p for p in self.folder.glob("*.h5")}
        if not self._files:
            raise SourceError(f"{folder}: no .h5 files")

    def slide_ids(self) -> list[str]:
        return sorted(self._files)

    def label_of(self, slide_id: str) -> str | None:
        return None

    def load(self, slide_id: str) -> RawBag:
        path = self._files[slide_id]
        try:
            with h5py.File(path, "r") as f:
                key = next((k for k in FEATURE_KEYS if k in f), None)
                if key is None:
                    raise SourceError(f"{path}: no 'features' dataset (has {sorted(f.keys())})")
                feats = as_matrix(f[key][()], str(path), key)
                coords = as_matrix(f["coords"][()], str(path), "coords") if "coords" in f else None
        except OSError as err:
            raise SourceError(f"{path}: not a readable HDF5 file: {err}") from None
        return RawBag(slide_id, feats, coords, None, str(path))

    def close(self) -> None:
        pass
