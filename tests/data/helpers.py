"""Tiny datasets for data-plane tests: good ones from the real writer, bad ones written by hand."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from aem_dist import storage
from aem_dist.data.manifest import FORMAT, MANIFEST, BagEntry, Manifest, ShardEntry, SplitEntry
from aem_dist.data.schema import Bag, encode_bag
from aem_dist.data.shards import write_dataset

DIM = 4
CLASSES = ["neg", "pos"]


def tiny_bag(i: int, n: int | None = None, dim: int = DIM, label: int | None = None, prefix: str = "bag") -> Bag:
    """Bag ``i``: n = 3 + i % 4 instances with values that identify the bag (exactly representable in fp16)."""
    n = 3 + i % 4 if n is None else n
    feats = (np.arange(n * dim, dtype=np.float32).reshape(n, dim) % 17 + i).astype(np.float16)
    coords = np.stack([np.arange(n), np.full(n, i)], axis=1).astype(np.int32) * 256
    return Bag(f"{prefix}-{i:03d}", feats, label if label is not None else i % 2, coords)


def write_tiny(root: str, n_train: int = 12, n_val: int = 5, *, shard_bytes: int = 400, options=None, dim: int = DIM) -> Manifest:
    """A small dataset with several shards per split (shard_bytes is tiny on purpose)."""
    pairs = [("train", tiny_bag(i, dim=dim)) for i in range(n_train)] + [("val", tiny_bag(100 + i, dim=dim)) for i in range(n_val)]
    return write_dataset(root, pairs, dim, CLASSES, options=options, shard_bytes=shard_bytes)


def npy(arr: Any, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def members_of(bag: Bag) -> list[tuple[str, bytes]]:
    return [(f"{bag.key}.{ext}", data) for ext, data in encode_bag(bag).items()]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def write_raw_dataset(root: str, shards: list[tuple[bytes, list[tuple[str, int, int]]]], *, split: str = "train", dim: int = DIM, options=None) -> Manifest:
    """A dataset from hand-made shard bytes: ``shards`` = [(tar bytes, [(key, label, n), ...]), ...].

    The manifest's bytes and sha256 match the given bytes, so only the defect inside is tested.
    """
    entries = []
    counts = [0] * len(CLASSES)
    for i, (data, bags) in enumerate(shards):
        name = f"{split}-{i:06d}.tar"
        storage.atomic_write_bytes(storage.join(root, name), data, options)
        entries.append(ShardEntry(name=name, n_bags=len(bags), n_instances=sum(b[2] for b in bags), bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), bags=[BagEntry(key=k, label=min(lab, len(CLASSES) - 1), n=n) for k, lab, n in bags]))
        for _, lab, _ in bags:
            counts[min(lab, len(CLASSES) - 1)] += 1
    manifest = Manifest(format=FORMAT, dim=dim, class_names=CLASSES, splits={split: SplitEntry(n_bags=sum(e.n_bags for e in entries), n_instances=sum(e.n_instances for e in entries), class_counts=counts, shards=entries)})
    storage.atomic_write_text(storage.join(root, MANIFEST), manifest.to_json(), options)
    return manifest


def bag_row(bag: Bag) -> tuple[str, int, int]:
    return (bag.key, bag.label, bag.n)


def flip_byte(path: str | Path, offset: int) -> None:
    p = Path(path)
    data = bytearray(p.read_bytes())
    data[offset] ^= 0xFF
    p.write_bytes(bytes(data))


def meta_json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()
