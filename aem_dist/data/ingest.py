"""``aem-dist ingest``: turn a source format plus a labels CSV into a dataset (shards + manifest).

Steps: list the source's slides; join the labels CSV (or the labels the format carries); map class
names to indices; take splits from the CSV or make a seeded stratified split; shuffle each split
(seeded, so shards mix classes even when the CSV is sorted by label); validate and write one bag at a
time with a progress bar. Memory holds one bag. Bad bags follow ``on_bad`` ('error' or 'skip').
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import storage
from ..storage import StorageOptions
from .manifest import Manifest
from .schema import Bag, BadSampleError
from .shards import DEFAULT_SHARD_BYTES, DatasetWriter
from .limits import Limits
from .sources import RawBag, SourceError, open_source
from .sources.labels import class_names_for, match_ids, read_labels, stratified_split

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    manifest: Manifest
    skipped: Counter = field(default_factory=Counter)
    unlabelled: int = 0  # source slides the labels CSV does not mention (not ingested)


def to_bag(raw: RawBag, label: int, dim: int | None) -> Bag:
    """Validate a source bag and convert it to the stored dtypes. Raises BadSampleError naming the file."""
    feats = np.asarray(raw.feats)
    where = raw.origin
    if feats.dtype.kind not in "fiu":
        raise BadSampleError("bad_dtype", f"{where}: features dtype {feats.dtype} is not numeric", key=raw.slide_id)
    if feats.shape[0] == 0:
        raise BadSampleError("empty_bag", f"{where}: bag has 0 instances", key=raw.slide_id)
    if dim is not None and feats.shape[1] != dim:
        raise BadSampleError("dim_mismatch", f"{where}: feature dim {feats.shape[1]} != dataset dim {dim}", key=raw.slide_id)
    feats16 = feats.astype(np.float16)
    if not np.isfinite(feats16).all():
        why = "NaN or Inf" if not np.isfinite(feats).all() else "values beyond float16 range (±65504)"
        raise BadSampleError("non_finite", f"{where}: features contain {why}", key=raw.slide_id)
    coords = None
    if raw.coords is not None:
        c = np.asarray(raw.coords)
        if c.shape != (feats.shape[0], 2):
            raise BadSampleError("bad_shape", f"{where}: coords shape {c.shape} != ({feats.shape[0]}, 2)", key=raw.slide_id)
        coords = np.rint(c).astype(np.int32) if c.dtype.kind == "f" else c.astype(np.int32)
    return Bag(raw.slide_id, feats16, label, coords, {"source": where.rsplit("/", 1)[-1]})


def ingest(
    fmt: str,
    src: str,
    out: str,
    *,
    labels_csv: str | None = None,
    classes: list[str] | None = None,
    val_frac: float = 0.1,
    test_frac: float = 0.2,
    seed: int = 0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    on_bad: str = "error",
    options: StorageOptions | None = None,
    progress: bool = True,
    limits: Limits | None = None,
) -> IngestResult:
    """Write the dataset at ``out``; returns its manifest and what was skipped. Shapes the source files
    declare are checked against ``limits`` before they are read."""
    from ..progress import progress as progress_bar

    source = open_source(fmt, src, limits)
    skipped: Counter = Counter()

    def bad(err: BadSampleError) -> None:
        if on_bad != "skip":
            raise err
        skipped[err.reason] += 1
        log.warning("ingest: skipping %s", err)

    try:
        source_ids = source.slide_ids()
        if labels_csv:
            rows = read_labels(labels_csv)
            matched = match_ids([r.slide_id for r in rows], set(source_ids))
            for r in rows:
                if r.slide_id not in matched:
                    bad(BadSampleError("missing_features", f"{labels_csv}: slide {r.slide_id!r} has no features in {src}", key=r.slide_id))
            rows = [r for r in rows if r.slide_id in matched]
            ids = [matched[r.slide_id] for r in rows]
            labels = [r.label for r in rows]
            given_splits = [r.split for r in rows]
            unlabelled = len(set(source_ids) - set(ids))
            if unlabelled:
                log.info("ingest: %d slide(s) in %s are not in %s and are left out", unlabelled, src, labels_csv)
        else:
            ids, labels, given_splits, unlabelled = [], [], [], 0
            for sid in source_ids:
                lab = source.label_of(sid)
                if lab is None:
                    raise SourceError(f"{src}: format {fmt!r} carries no labels; pass --labels slide_id,label[,split] CSV")
                ids.append(sid)
                labels.append(lab)
                given_splits.append(None)
        if not ids:
            raise SourceError(f"no slide to ingest from {src}" + (f" with labels {labels_csv}" if labels_csv else ""))
        names, index = class_names_for(labels, classes)
        y = [index[lab] for lab in labels]
        if all(s is not None for s in given_splits):
            split_of = dict(zip(ids, given_splits))
            how = "from the labels CSV"
        else:
            split_of = stratified_split(ids, y, val_frac=val_frac, test_frac=test_frac, seed=seed)
            how = f"stratified, seed {seed}, val {val_frac}, test {test_frac}"
        label_of = dict(zip(ids, y))
        rng = np.random.default_rng([seed, 0x1A6E57])
        order = [(split, sid) for split in ("train", "val", "test") for sid in rng.permutation(sorted(i for i in ids if split_of[i] == split)).tolist()]

        source_meta: dict[str, Any] = {"format": fmt, "src": storage.redact(src, options), "labels": labels_csv, "split": how, "seed": seed}
        dim: int | None = None
        writer: DatasetWriter | None = None
        try:
            with progress_bar(len(order), f"ingest {fmt}", "bag", disable=not progress) as bar:
                for split, sid in order:
                    bar.update(1)
                    try:
                        bag = to_bag(source.load(sid), label_of[sid], dim)
                    except BadSampleError as err:
                        bad(err)
                        continue
                    if writer is None:
                        dim = bag.dim
                        writer = DatasetWriter(out, dim, names, options=options, shard_bytes=shard_bytes, source=source_meta)
                    writer.add(split, bag)
            if writer is None:
                raise SourceError(f"every slide from {src} was skipped: {dict(skipped)}")
            writer.source["skipped"] = dict(skipped)
            manifest = writer.close()
        except BaseException:
            if writer is not None and writer.manifest is None:
                writer.abort()
            raise
    finally:
        source.close()
    return IngestResult(manifest, skipped, unlabelled)
