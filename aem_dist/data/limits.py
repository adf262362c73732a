"""Sizes that come from outside are checked before anything is allocated from them.

A tar header, an npy header, an HDF5 or zarr array's shape, a manifest's ``dim`` and per-bag counts
all *declare* a size. A few KB of hostile input can declare terabytes; allocating first and failing
later either exhausts memory or ends in a raw ``MemoryError``. Each reader therefore checks a declared
size (1) against the bytes actually present and (2) against :class:`Limits` (``data.max_instances_per_bag``,
``data.max_dim``), and refuses with one clear line otherwise. Functions here return nothing or raise
:class:`SizeError`; callers re-raise it as their own error type with the file/shard/key named.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

MAX_TAR_HEADER_BYTES = 1 << 20  # a pax or GNU long-name header holds a few names, never megabytes
MAX_HEATMAP_CELLS = 1 << 26  # 8192 × 8192 grid cells: a whole slide at any usual patch size
# Compressed inputs (gzip/zstd HDF5 and zarr chunks, deflated zip entries of a .pt) may expand at most
# this much: patch features are noise-like floats that compress ~1.1-2×, coords ~10×. A few MB that
# declare gigabytes within the shape limits (constant chunks: 4 MB of gzip → 9.2 GB) are refused before
# a byte is decompressed. Arrays below EXPANSION_FREE_BYTES are never refused for it.
MAX_EXPANSION = 50
EXPANSION_FREE_BYTES = 64 << 20


class SizeError(ValueError):
    """A declared size is impossible (more than the bytes present) or above a configured limit."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds for one bag (see ``data.max_instances_per_bag`` / ``data.max_dim``) and one dataset."""

    max_instances_per_bag: int = 1_000_000
    max_dim: int = 16_384
    max_bags: int = 1_000_000  # bags one dataset (manifest) may list: 30× the largest public WSI cohorts

    @classmethod
    def from_config(cls, data: Any = None) -> "Limits":
        """From a ``DataConfig`` (or None for the defaults)."""
        if data is None:
            return cls()
        return cls(int(data.max_instances_per_bag), int(data.max_dim))

    def check_bag(self, n: int, d: int | None = None, what: str = "bag") -> None:
        """Raise SizeError if ``n`` instances or ``d`` features exceed the limits."""
        if n > self.max_instances_per_bag:
            raise SizeError(f"{what} declares {n:,} instances, above data.max_instances_per_bag = {self.max_instances_per_bag:,}")
        if d is not None and d > self.max_dim:
            raise SizeError(f"{what} declares feature dim {d:,}, above data.max_dim = {self.max_dim:,}")


def check_matrix_shape(shape: tuple[int, ...], limits: Limits, what: str) -> None:
    """A (N, D) — or TRIDENT's (1, N, D) — shape declared by a file, checked before it is read."""
    dims = tuple(int(s) for s in shape)
    if len(dims) == 3 and dims[0] == 1:
        dims = dims[1:]
    if len(dims) != 2:
        return  # the reader reports the wrong rank itself, after a read of bounded size
    limits.check_bag(dims[0], dims[1], what)


def npy_array_shape(data: bytes, what: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an npy blob declares, checked against the bytes it holds (header only parsed).

    Raises SizeError when the declared array needs more (or fewer) bytes than follow the header, and
    ValueError (from numpy) when the header itself is invalid."""
    f = io.BytesIO(data)
    version = np.lib.format.read_magic(f)
    reader = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise ValueError(f"unsupported npy format version {version}")
    shape, _fortran, dtype = reader(f, max_header_size=10_000)
    if dtype.hasobject:
        return shape, dtype  # refused by the caller as an object array (never unpickled)
    need = math.prod(shape) * dtype.itemsize
    have = len(data) - f.tell()
    if need != have:
        raise SizeError(f"{what} declares shape {tuple(shape)} of {dtype} ({need:,} bytes) but holds {have:,} bytes")
    return shape, dtype


def check_expansion(declared: int, stored: int, what: str) -> None:
    """``declared`` bytes decompressed from ``stored`` bytes: refused above MAX_EXPANSION × (and
    EXPANSION_FREE_BYTES), before anything is decompressed. Raises SizeError."""
    if declared > max(EXPANSION_FREE_BYTES, MAX_EXPANSION * stored):
        raise SizeError(f"{what} would expand {stored:,} stored bytes to {declared:,} ({declared / max(stored, 1):,.0f}×, limit {MAX_EXPANSION}×): a "
            f"decompression bomb, not features")


def check_stored_fully(arr: Any, what: str) -> None:
    """An HDF5 dataset or zarr array must have every chunk stored: missing chunks read back as the fill
    value, so a tiny file can declare a huge array. Compressed chunks may not expand more than
    :data:`MAX_EXPANSION` (see :func:`check_expansion`). Raises SizeError naming stored vs. declared."""
    n_chunks = getattr(arr, "nchunks", None)
    if n_chunks is not None:  # zarr
        stored = arr.nchunks_initialized
        if stored < n_chunks:
            raise SizeError(f"{what} declares shape {tuple(arr.shape)} but only {stored} of its {n_chunks} chunks are stored")
        check_expansion(int(arr.nbytes), int(arr.nbytes_stored()), what)
        return
    dsid = getattr(arr, "id", None)
    if dsid is None or not hasattr(dsid, "get_storage_size"):
        return
    nbytes = int(np.prod(arr.shape, dtype=np.int64)) * arr.dtype.itemsize
    if nbytes == 0:
        return
    if arr.chunks is None:  # contiguous or compact: stored at full size, or not at all
        stored = dsid.get_storage_size()
        if stored < nbytes:
            raise SizeError(f"{what} declares shape {tuple(arr.shape)} ({nbytes:,} bytes) but stores {stored:,} bytes")
        return
    expected = math.prod(math.ceil(s / c) for s, c in zip(arr.shape, arr.chunks))
    stored = dsid.get_num_chunks()
    if stored < expected:
        raise SizeError(f"{what} declares shape {tuple(arr.shape)} but only {stored} of its {expected} chunks are stored")
    check_expansion(nbytes, int(dsid.get_storage_size()), what)


def check_grid(cells: np.ndarray, what: str) -> tuple[int, int]:
    """The (rows, cols) of a heatmap grid from its cells, refused above MAX_HEATMAP_CELLS."""
    if len(cells) == 0:
        return (1, 1)
    cols, rows = (int(v) + 1 for v in cells.max(axis=0))
    if rows * cols > MAX_HEATMAP_CELLS:
        raise SizeError(f"{what}: coordinates span a {rows:,} × {cols:,} grid of patches (more than {MAX_HEATMAP_CELLS:,} cells); are the coords patch "
            f"offsets?")
    return rows, cols
