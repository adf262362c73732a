"""The bag record, its encoding as WebDataset members, and safe decoding.

A bag is one slide: ``feats`` (N × D float16), optional ``coords`` (N × 2 int32), a label and free
metadata. The label is a class index, or :data:`UNLABELLED` (-1) for a slide ingested with
``--no-labels`` (predicted, never trained or scored on). On storage it is three tar members sharing a key::

    <key>.feats.npy    float16 (N, D)
    <key>.coords.npy   int32   (N, 2)   optional
    <key>.json         {"slide_id", "label", "n_instances", "dim", ...metadata}

WebDataset splits a member name at the first dot, so ``<key>`` is the slide id made safe
(:func:`safe_key`); the real id lives in the json. Decoding reads npy with ``allow_pickle=False``
and looks at nothing but these three members: nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FEATS = "feats.npy"
COORDS = "coords.npy"
META = "json"
MEMBERS = (FEATS, COORDS, META)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
FEATURE_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))  # what training converts
UNLABELLED = -1  # the label of a slide without one (``ingest --no-labels``)


class BadSampleError(ValueError):
    """A bag failed validation. ``reason`` is a short stable code used for skip counters."""

    def __init__(self, reason: str, message: str, *, shard: str | None = None, key: str | None = None):
        self.reason = reason
        self.message = message
        self.shard = shard
        self.key = key
        where = ", ".join(p for p in (f"shard {shard}" if shard else "", f"key {key!r}" if key else "") if p)
        super().__init__(f"{where}: {message} [{reason}]" if where else f"{message} [{reason}]")

    def located(self, shard: str | None = None, key: str | None = None) -> "BadSampleError":
        """The same error with its location filled in (readers know the shard, decoders the key)."""
        return BadSampleError(self.reason, self.message, shard=shard or self.shard, key=key or self.key)


def safe_key(slide_id: str) -> str:
    """A WebDataset-safe key for a slide id: letters, digits, '_' and '-' only.

    Ids that are already safe stay as they are; others get their unsafe characters replaced and a
    short hash of the real id appended, so 'a.b' and 'a_b' cannot collide.
    """
    slide_id = str(slide_id)
    if not slide_id:
        raise ValueError("empty slide id")
    cleaned = _UNSAFE.sub("_", slide_id)
    if cleaned == slide_id:
        return slide_id
    digest = hashlib.sha1(slide_id.encode("utf-8")).hexdigest()[:10]
    return f"{cleaned[:80]}-{digest}"


@dataclass
class Bag:
    """One slide's feature bag."""

    slide_id: str
    feats: np.ndarray  # (N, D) float16 on storage; float32 in memory is fine
    label: int
    coords: np.ndarray | None = None  # (N, 2) int32
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return safe_key(self.slide_id)

    @property
    def n(self) -> int:
        return int(self.feats.shape[0])

    @property
    def dim(self) -> int:
        return int(self.feats.shape[1])


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def encode_bag(bag: Bag) -> dict[str, bytes]:
    """Members of one sample, keyed by extension ('feats.npy', 'coords.npy', 'json')."""
    feats = np.asarray(bag.feats)
    if feats.ndim != 2:
        raise ValueError(f"bag {bag.slide_id!r}: feats must be 2-D (N, D), got shape {feats.shape}")
    members = {FEATS: _npy_bytes(feats.astype(np.float16, copy=False))}
    if bag.coords is not None:
        coords = np.asarray(bag.coords)
        if coords.shape != (feats.shape[0], 2):
            raise ValueError(f"bag {bag.slide_id!r}: coords shape {coords.shape} != ({feats.shape[0]}, 2)")
        members[COORDS] = _npy_bytes(coords.astype(np.int32, copy=False))
    meta = {**bag.meta, "slide_id": bag.slide_id, "label": int(bag.label), "n_instances": int(feats.shape[0]), "dim": int(feats.shape[1])}
    members[META] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return members


def load_npy(data: bytes, what: str) -> np.ndarray:
    """np.load with ``allow_pickle=False``; any failure is a BadSampleError with a reason code.

    The header's shape is checked against the bytes present before numpy allocates the array
    (numpy allocates the declared size first, then finds the data short)."""
    from .limits import SizeError, npy_array_shape

    try:
        npy_array_shape(data, what)
    except SizeError as err:
        raise BadSampleError("npy_size", str(err)) from None
    except Exception as err:  # bad magic, unparsable header
        raise BadSampleError("corrupt_npy", f"{what} is not a valid npy: {type(err).__name__}: {err}") from None
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as err:
        if "allow_pickle" in str(err) or "Object arrays" in str(err):
            raise BadSampleError("object_dtype", f"{what} holds an object array (would need unpickling)") from None
        raise BadSampleError("corrupt_npy", f"{what} is not a valid npy: {err}") from None
    except Exception as err:  # truncated header, bad magic, short data
        raise BadSampleError("corrupt_npy", f"{what} is not a valid npy: {type(err).__name__}: {err}") from None
    if arr.dtype.hasobject:
        raise BadSampleError("object_dtype", f"{what} has object dtype")
    return arr


def decode_bag(
    members: dict[str, bytes],
    *,
    dim: int | None = None,
    n_classes: int | None = None,
    check_finite: bool = True,
) -> Bag:
    """Validate and decode one sample's members (extension → bytes). Raises :class:`BadSampleError`.

    Only ``feats.npy``, ``coords.npy`` and ``json`` are read; other members are ignored unread.
    """
    if META not in members:
        raise BadSampleError("missing_member", "no .json member")
    if FEATS not in members:
        raise BadSampleError("missing_member", "no .feats.npy member")
    try:
        meta = json.loads(members[META].decode("utf-8"))
    except Exception as err:
        raise BadSampleError("bad_json", f"json member does not parse: {err}") from None
    if not isinstance(meta, dict):
        raise BadSampleError("bad_json", "json member is not an object")
    if "label" not in meta or meta["label"] is None:
        raise BadSampleError("missing_label", "json has no 'label'")
    label = meta["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise BadSampleError("bad_label", f"label {label!r} is not an integer class index")
    if (label < 0 and label != UNLABELLED) or (n_classes is not None and label >= n_classes):
        raise BadSampleError("label_out_of_range", f"label {label} outside classes 0..{(n_classes or 0) - 1}")
    slide_id = meta.get("slide_id")
    if not isinstance(slide_id, str) or not slide_id:
        raise BadSampleError("bad_json", "json has no 'slide_id' string")

    feats = load_npy(members[FEATS], "feats.npy")
    if feats.ndim != 2:
        raise BadSampleError("bad_shape", f"feats.npy must be 2-D, got shape {feats.shape}")
    if feats.dtype not in FEATURE_DTYPES:
        raise BadSampleError("bad_dtype", f"feats.npy dtype {feats.dtype} is not float16, float32 or float64")
    if feats.shape[0] == 0:
        raise BadSampleError("empty_bag", "bag has 0 instances")
    if dim is not None and feats.shape[1] != dim:
        raise BadSampleError("dim_mismatch", f"feature dim {feats.shape[1]} != manifest dim {dim}")
    if check_finite and not np.isfinite(feats).all():
        raise BadSampleError("non_finite", "features contain NaN or Inf")
    if check_finite and feats.dtype == np.float64 and np.abs(feats).max() > np.finfo(np.float32).max:
        # finite here, Inf once cast to the float32 that training packs
        raise BadSampleError("non_finite", "features hold values beyond float32 range (Inf once converted for training)")
    if check_finite and feats.dtype != np.float16 and np.abs(feats).max() > np.finfo(np.float16).max:
        # finite, but no encoder gives such features: the first layer overflows and training stops on a
        # non-finite loss epochs later. ingest refuses the same values (shards are float16).
        raise BadSampleError("non_finite", "features hold values beyond float16 range (±65504), as no feature extractor writes; they overflow in training")
    n_meta = meta.get("n_instances")
    if n_meta is not None and n_meta != feats.shape[0]:
        raise BadSampleError("count_mismatch", f"json n_instances {n_meta} != {feats.shape[0]} rows in feats.npy")

    coords = None
    if COORDS in members:
        coords = load_npy(members[COORDS], "coords.npy")
        if coords.shape != (feats.shape[0], 2):
            raise BadSampleError("bad_shape", f"coords.npy shape {coords.shape} != ({feats.shape[0]}, 2)")
        if coords.dtype.kind not in "iu":
            raise BadSampleError("bad_dtype", f"coords.npy dtype {coords.dtype} is not integer")
    extra = {k: v for k, v in meta.items() if k not in ("slide_id", "label", "n_instances", "dim")}
    return Bag(slide_id=slide_id, feats=feats, label=int(label), coords=coords, meta=extra)


def bag_nbytes(n: int, dim: int) -> int:
    """Approximate in-memory float16 size of a bag."""
    return int(n) * int(dim) * 2


def human_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = min(int(math.log(n, 1024)), len(units) - 1)
    return f"{n / 1024 ** i:.1f} {units[i]}"
