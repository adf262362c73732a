"""The AEM / ACMIL single HDF5 file: a group per slide with ``feat`` (N, D), ``coords`` (N, 2) and the
slide label in the group's ``attrs['label']`` (an int or a class name)."""

from __future__ import annotations

import h5py

from ..limits import Limits
from . import FEATURE_KEYS, RawBag, SourceError, h5_has, h5_member, label_text, read_matrix


class AcmilH5Source:
    fmt = "acmil"
    limits = Limits()

    def __init__(self, path: str):
        self.path = path
        try:
            self._f = h5py.File(path, "r")
        except OSError as err:
            raise SourceError(f"{path}: not a readable HDF5 file: {err}") from None
        self._ids = sorted(k for k in self._f if self._is_slide(k))
        if not self._ids:
            raise SourceError(f"{path}: no slide groups (expected <slide>/feat)")

    def _is_slide(self, name: str) -> bool:
        """A top-level group; links are listed unfollowed (following an external link opens another
        file) and refused by name when the slide is loaded (see h5_member)."""
        if not isinstance(self._f.get(name, getlink=True), h5py.HardLink):
            return True
        return self._f.get(name, getclass=True) is h5py.Group

    def slide_ids(self) -> list[str]:
        return list(self._ids)

    def label_of(self, slide_id: str) -> str | None:
        return label_text(h5_member(self._f, slide_id, self.path).attrs.get("label"))

    def load(self, slide_id: str) -> RawBag:
        g = h5_member(self._f, slide_id, self.path)
        origin = f"{self.path}:{slide_id}"
        key = next((k for k in FEATURE_KEYS if h5_has(g, k)), None)
        if key is None:
            raise SourceError(f"{origin}: no 'feat' dataset (has {sorted(g.keys())})")
        feats = read_matrix(h5_member(g, key, origin), origin, key, self.limits)
        coords = read_matrix(h5_member(g, "coords", origin), origin, "coords", self.limits) if h5_has(g, "coords") else None
        return RawBag(slide_id, feats, coords, self.label_of(slide_id), origin)

    def close(self) -> None:
        self._f.close()
