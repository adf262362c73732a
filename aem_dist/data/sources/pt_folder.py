"""Folders of ``<slide>.pt`` (CLAM's pt_files): a (N, D) tensor, or a dict with ``features`` and
optionally ``coords``. Loaded with ``torch.load(weights_only=True)``: tensors and plain containers
only, never arbitrary pickled objects."""

from __future__ import annotations

import zipfile

import torch

from ..limits import SizeError, check_expansion, check_matrix_shape
from . import FEATURE_KEYS, FolderSource, RawBag, SourceError, as_matrix


def _check_archive(path) -> None:
    """A torch zip whose entries would expand beyond MAX_EXPANSION (deflated storages) is refused from
    its central directory, before torch.load reads a byte of it."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format: torch reads storages as stored
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise SourceError(f"{path}: not a readable torch file: {err}") from None
    check_expansion(sum(e.file_size for e in entries), path.stat().st_size, f"{path}")


def _tensor(value, path, field: str, limits) -> "torch.Tensor":
    """A tensor from the file as a matrix source: its shape within ``limits`` and its data really stored
    (an expanded or overlapping view, e.g. a stride-0 ``expand`` of 1e8 × 16 saved in 1.5 KB, would
    become gigabytes when copied). Raises SourceError naming the file and field."""
    if not isinstance(value, torch.Tensor):
        raise SourceError(f"{path}: {field} are a {type(value).__name__}, not a tensor")
    try:
        check_matrix_shape(tuple(value.shape), limits, f"{path}: {field!r}")
    except SizeError as err:
        raise SourceError(str(err)) from None
    need = value.numel() * value.element_size()
    have = value.untyped_storage().nbytes() - value.storage_offset() * value.element_size()
    if need > have or any(st == 0 and n > 1 for st, n in zip(value.stride(), value.shape)):
        raise SourceError(f"{path}: {field!r} is an expanded or overlapping view: shape {tuple(value.shape)} ({need:,} bytes) over {have:,} stored bytes")
    return value


class PtFolderSource(FolderSource):
    fmt = "pt"
    suffix = ".pt"

    def load(self, slide_id: str) -> RawBag:
        path = self._files[slide_id]
        try:
            _check_archive(path)
        except SizeError as err:
            raise SourceError(str(err)) from None
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
                coords = as_matrix(_tensor(torch.as_tensor(coords_t), path, "coords", self.limits).numpy(), str(path), "coords")
        else:
            feats_t = obj
        feats_t = _tensor(feats_t, path, "features", self.limits)
        return RawBag(slide_id, as_matrix(feats_t.float().numpy(), str(path), "features"), coords, None, str(path))
