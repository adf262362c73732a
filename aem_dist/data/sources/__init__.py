"""Input formats that become datasets (one module per format, each yielding bags).

Every source lists its slides, says a slide's label when the format carries one, and loads one
slide at a time (so ingestion memory is one bag, whatever the dataset size)::

    clam / trident   folder of <slide>.h5 with 'features' (N, D) and 'coords' (N, 2)   (h5_folder)
    pt               folder of <slide>.pt: a (N, D) tensor or {'features', 'coords'}   (pt_folder)
    acmil            one HDF5 file: <slide>/feat, <slide>/coords, attrs['label']      (acmil_h5)
    zarr             a zarr store: group <slide> with 'features', 'coords', attrs['label'] (zarr_store)
    mil-csv          classic MIL CSV rows: bag label, bag id, features…               (mil_csv)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..limits import Limits, SizeError, check_matrix_shape, check_stored_fully


class SourceError(ValueError):
    """An input file is unreadable or malformed; the message names the file and the field."""


@dataclass
class RawBag:
    """One slide as a source delivers it, before validation."""

    slide_id: str
    feats: np.ndarray  # (N, D), any float dtype
    coords: np.ndarray | None  # (N, 2) or None
    label: str | None  # the label the source itself carries (as text), if any
    origin: str  # file (and key) it came from, for messages


class Source(Protocol):
    fmt: str
    limits: Limits  # set by open_source; read_matrix checks declared shapes against it

    def slide_ids(self) -> list[str]:
        """Every slide the source holds, sorted."""

    def label_of(self, slide_id: str) -> str | None:
        """The label the source carries for ``slide_id`` (cheap: no features read), or None."""

    def load(self, slide_id: str) -> RawBag:
        """Read one slide. Raises SourceError naming the file and field."""

    def close(self) -> None: ...


FEATURE_KEYS = ("features", "feats", "feat")  # names CLAM, TRIDENT and the AEM/ACMIL code use


class FolderSource:
    """A folder with one file per slide, ``<slide><suffix>``; subclasses read one file in ``load``."""

    fmt = ""
    suffix = ""
    limits = Limits()

    def __init__(self, folder: str):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SourceError(f"{folder}: not a folder of <slide>{self.suffix} files")
        self._files = {p.name[: -len(self.suffix)]: p for p in self.folder.glob(f"*{self.suffix}")}
        if not self._files:
            raise SourceError(f"{folder}: no {self.suffix} files")

    def slide_ids(self) -> list[str]:
        return sorted(self._files)

    def label_of(self, slide_id: str) -> str | None:
        return None  # per-slide files carry no label: it comes from the labels CSV

    def load(self, slide_id: str) -> RawBag:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class SourceFormat:
    """One ``--format``: the reader class (in a module of this package, imported only when used, so h5py,
    zarr and torch load only for their own formats), constructed with the source path."""

    module: str
    reader: str
    help: str  # what ``ingest --help`` says about the format


FORMATS: dict[str, SourceFormat] = {
    "clam": SourceFormat("h5_folder", "H5FolderSource", "folder of <slide>.h5 with features, coords"),
    "trident": SourceFormat("h5_folder", "H5FolderSource", "the same, as TRIDENT writes it"),
    "pt": SourceFormat("pt_folder", "PtFolderSource", "folder of <slide>.pt"),
    "acmil": SourceFormat("acmil_h5", "AcmilH5Source", "one HDF5: <slide>/feat, coords, attrs label"),
    "zarr": SourceFormat("zarr_store", "ZarrSource", "group per slide: features, coords, attrs label"),
    "mil-csv": SourceFormat("mil_csv", "MilCsvSource", "rows: label, bag id, features…"),
}


def open_source(fmt: str, src: str, limits: Limits | None = None) -> Source:
    """The source for format ``fmt`` at local path ``src``; declared shapes are checked against ``limits``."""
    entry = FORMATS.get(fmt)
    if entry is None:
        raise SourceError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    reader = getattr(importlib.import_module(f"{__name__}.{entry.module}"), entry.reader)
    source = reader(src)
    source.fmt = fmt
    source.limits = limits or Limits()
    return source


def as_matrix(arr: object, origin: str, field: str) -> np.ndarray:
    """A 2-D array from what a file holds; a leading axis of 1 (TRIDENT's (1, N, D)) is dropped."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2:
        raise SourceError(f"{origin}: {field!r} must be 2-D, got shape {a.shape}")
    if a.dtype.hasobject:
        raise SourceError(f"{origin}: {field!r} has object dtype")
    return a


def read_matrix(arr: Any, origin: str, field: str, limits: Limits | None = None) -> np.ndarray:
    """Read an HDF5 dataset or zarr array as a 2-D matrix, after checking the shape it declares against
    ``limits`` and that all of it is really stored (a few KB must not become gigabytes of fill value)."""
    try:
        check_matrix_shape(tuple(arr.shape), limits or Limits(), f"{origin}: {field!r}")
        check_stored_fully(arr, f"{origin}: {field!r}")
    except SizeError as err:
        raise SourceError(str(err)) from None
    return as_matrix(arr[...], origin, field)


def h5_has(group: Any, name: str) -> bool:
    """Whether ``group`` has a link called ``name``, without following it (``name in group`` would
    open the file an external link names)."""
    return group.get(name, getlink=True) is not None


def h5_member(group: Any, name: str, origin: str) -> Any:
    """``group[name]``, refused by name when its data would come from outside the file: an HDF5 external
    link, a soft link resolving outside the file, a virtual dataset (its data lives in source files) or
    a dataset with external storage (raw bytes of any file, e.g. /etc/passwd). Raises SourceError."""
    import h5py

    link = group.get(name, getlink=True)
    if isinstance(link, h5py.ExternalLink):
        raise SourceError(f"{origin}: {name!r} is an HDF5 external link to {link.filename}:{link.path}; an input must hold its own data")
    try:
        obj = group[name]
    except (KeyError, OSError) as err:
        raise SourceError(f"{origin}: {name!r} cannot be opened ({type(err).__name__}: {err})") from None
    if obj.file.filename != group.file.filename or obj.file.id != group.file.id:
        raise SourceError(f"{origin}: {name!r} resolves into another file ({obj.file.filename}); an input must hold its own data")
    if isinstance(obj, h5py.Dataset):
        if obj.is_virtual:
            raise SourceError(f"{origin}: {name!r} is an HDF5 virtual dataset (its data lives in other files); an input must hold its own data")
        if obj.external:
            files = sorted({str(e[0]) for e in obj.external})
            raise SourceError(f"{origin}: {name!r} uses HDF5 external storage ({', '.join(files)[:200]}); an input must hold its own data")
    return obj


def label_text(value: object) -> str | None:
    """Labels as text: bytes decoded, numpy scalars unwrapped, 1.0 → '1'."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    if isinstance(value, np.ndarray):
        value = value.item() if value.size == 1 else value.tolist()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()
