"""A zarr store (v2 or v3): one group per slide holding a ``features`` array (N, D), optionally
``coords`` (N, 2), and the label in the group's ``attrs['label']`` (or from the labels CSV)."""

from __future__ import annotations

import zarr

from ..limits import Limits
from . import FEATURE_KEYS, RawBag, SourceError, label_text, read_matrix


class ZarrSource:
    fmt = "zarr"
    limits = Limits()

    def __init__(self, path: str):
        self.path = path
        try:
            self._root = zarr.open_group(path, mode="r")
        except Exception as err:
            raise SourceError(f"{path}: not a readable zarr group: {type(err).__name__}: {err}") from None
        self._ids = sorted(name for name, _ in self._root.groups())
        if not self._ids:
            raise SourceError(f"{path}: no slide groups (expected <slide>/features)")

    def slide_ids(self) -> list[str]:
        return list(self._ids)

    def label_of(self, slide_id: str) -> str | None:
        return label_text(self._root[slide_id].attrs.get("label"))

    def load(self, slide_id: str) -> RawBag:
        g = self._root[slide_id]
        origin = f"{self.path}/{slide_id}"
        names = set(g.array_keys())
        key = next((k for k in FEATURE_KEYS if k in names), None)
        if key is None:
            raise SourceError(f"{origin}: no 'features' array (has {sorted(names)})")
        feats = read_matrix(g[key], origin, key, self.limits)
        coords = read_matrix(g["coords"], origin, "coords", self.limits) if "coords" in names else None
        return RawBag(slide_id, feats, coords, self.label_of(slide_id), origin)

    def close(self) -> None:
        pass
