"""The AEM / ACMIL single HDF5 file: a group per slide with ``feat`` (N, D), ``coords`` (N, 2) and the
slide label in the group's ``attrs['label']`` (an int or a class name)."""

from __future__ import annotations

import h5py

from ..limits import Limits
from . import FEATURE_KEYS, RawBag, SourceError, label_text, read_matrix


class AcmilH5Source:
    fmt = "acmil"
    limits = Limits()

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as err:
            raise SourceError(f"{path}: not a readable HDF5 file: {err}") from None
        self._ids = sorted(k for k, v in self._f.items() if isinstance(v, h5py.Group))
        if not self._ids:
            raise SourceError(f"{path}: no slide groups (expected <slide>/feat)")

    def slide_ids(self) -> list[str]:
        return list(self._ids)

    def label_of(self, slide_id: str) -> str | None:
        return label_text(self._f[slide_id].attrs.get("label"))

    def load(self, slide_id: str) -> RawBag:
        g = self._f[slide_id]
        origin = f"{self.path}:{slide_id}"
        key = next((k for k in FEATURE_KEYS if k in g), None)
        if key is None:
            raise SourceError(f"{origin}: no 'feat' dataset (has {sorted(g.keys())})")
        feats = read_matrix(g[key], origin, key, self.limits)
        coords = read_matrix(g["coords"], origin, "coords", self.limits) if "coords" in g else None
        return RawBag(slide_id, feats, coords, self.label_of(slide_id), origin)

    def close(self) -> None:
        self._f.close()
