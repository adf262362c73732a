"""CLAM / TRIDENT feature folders: one ``<slide>.h5`` per slide with ``features`` (N, D) and ``coords`` (N, 2).

TRIDENT writes the same two datasets (sometimes ``features`` as (1, N, D)); labels come from the
labels CSV.
"""

from __future__ import annotations

import h5py

from . import FEATURE_KEYS, FolderSource, RawBag, SourceError, h5_has, h5_member, read_matrix


class H5FolderSource(FolderSource):
    fmt = "clam"  # or "trident": set by open_source
    suffix = ".h5"

    def dim_of(self, slide_id: str) -> int:
        """The feature dim from the file's header (no features read)."""
        path = self._files[slide_id]
        try:
            with h5py.File(path, "r") as f:
                key = _features_key(f, path)
                return int(h5_member(f, key, str(path)).shape[-1])
        except OSError as err:
            raise SourceError(f"{path}: not a readable HDF5 file: {err}") from None

    def load(self, slide_id: str) -> RawBag:
        path = self._files[slide_id]
        try:
            with h5py.File(path, "r") as f:
                key = _features_key(f, path)
                feats = read_matrix(h5_member(f, key, str(path)), str(path), key, self.limits)
                coords = read_matrix(h5_member(f, "coords", str(path)), str(path), "coords", self.limits) if h5_has(f, "coords") else None
        except OSError as err:
            raise SourceError(f"{path}: not a readable HDF5 file: {err}") from None
        return RawBag(slide_id, feats, coords, None, str(path))


def _features_key(f: h5py.File, path) -> str:
    """The features dataset's name in an open file; SourceError naming the file when there is none."""
    key = next((k for k in FEATURE_KEYS if h5_has(f, k)), None)
    if key is None:
        raise SourceError(f"{path}: no 'features' dataset (has {sorted(f.keys())})")
    return key
