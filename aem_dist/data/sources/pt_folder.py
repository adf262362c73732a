"""Folders of ``<slide>.pt`` (CLAM's pt_files): a (N, D) tensor, or a dict with ``features`` and
optionally ``coords``. Loaded with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects."""

from __future__ import annotations


import torch

from . import FEATURE_KEYS, FolderSource, RawBag, SourceError, as_matrix


class PtFolderSource(FolderSource):
    fmt = "pt"
    suffix = ".pt"

    def load(self, slide_id: str) -> RawBag:
        path = self._files[slide_id]
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # UnpicklingError for anything beyond tensors and containers
            raise SourceError(f"{path}: cannot be loaded with weights_only=True (only tensors and plain containers are accepted): {type(err).__name__}: "
                f"{str(err)[:200]}") from None
        coords = None
        if isinstance(obj, dict):
            key = next((k for k in FEATURE_KEYS if k in obj), None)
            if key is None:
                raise SourceError(f"{path}: dict without a 'features' entry (has {sorted(map(str, obj))})")
            feats_t, coords_t = obj[key], obj.get("coords")
            if coords_t is not None:
                coords = as_matrix(torch.as_tensor(coords_t).numpy(), str(path), "coords")
        else:
            feats_t = obj
        if not isinstance(feats_t, torch.Tensor):
            raise SourceError(f"{path}: features are a {type(feats_t).__name__}, not a tensor")
        return RawBag(slide_id, as_matrix(feats_t.float().numpy(), str(path), "features"), coords, None, str(path))
