"""``aem-dist ingest``: turn a source format plus a labels CSV into a dataset (shards + manifest).

Steps: list the source's slides; join the labels CSV (or the labels the format carries); map labels
(``label_map``) and refuse case/whitespace variants; map class names to indices; take splits from the
CSV (a case in two splits is an error) or make a seeded split stratified over cases; decide the
feature dim by consensus of all slides' headers (or ``dim``) before accepting any slide, so the odd
slides are the ones reported; shuffle each split (seeded, so shards mix classes even when the CSV is
sorted by label); validate and write one bag at a time with a progress bar. Memory holds one bag.
Bad bags follow ``on_bad`` ('error' or 'skip'); with ``report_all`` an error run reports every bad
bag at once instead of the first. With ``no_labels`` every slide of the source goes into the
``test`` split without a label (:data:`~aem_dist.data.schema.UNLABELLED`): a dataset to predict on.
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
from .schema import UNLABELLED, Bag, BadSampleError
from .shards import DEFAULT_SHARD_BYTES, DatasetWriter, check_output
from .limits import Limits
from .sources import RawBag, SourceError, open_source
from .sources.labels import check_case_splits, check_label_variants, class_names_for, grouped_stratified_split, match_ids, read_labels

log = logging.getLogger(__name__)


@dataclass
class IngestResult:
    manifest: Manifest
    skipped: Counter = field(default_factory=Counter)
    unlabelled: int = 0  # source slides the labels CSV does not mention (not ingested)


def to_bag(raw: RawBag, label: int, dim: int | None, dim_why: str = "") -> Bag:
    """Validate a source bag and convert it to the stored dtypes. Raises BadSampleError naming the file."""
    feats = np.asarray(raw.feats)
    where = raw.origin
    if feats.dtype.kind not in "fiu":
        raise BadSampleError("bad_dtype", f"{where}: features dtype {feats.dtype} is not numeric", key=raw.slide_id)
    if feats.shape[0] == 0:
        raise BadSampleError("empty_bag", f"{where}: bag has 0 instances", key=raw.slide_id)
    if dim is not None and feats.shape[1] != dim:
        raise BadSampleError("dim_mismatch", f"{where}: feature dim {feats.shape[1]} != dataset dim {dim}{dim_why}", key=raw.slide_id)
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
    case_column: str | None = None,
    label_map: dict[str, str] | None = None,
    dim: int | None = None,
    report_all: bool = False,
    no_labels: bool = False,
    overwrite: bool = True,
) -> IngestResult:
    """Write the dataset at ``out``; returns its manifest and what was skipped.

    Shapes the source files declare are checked against ``limits`` before they are read.
    ``case_column``: the labels CSV column grouping slides by case (default ``case_id`` if present).
    ``label_map``: raw label → class name, applied before anything else looks at labels. ``dim``: the
    feature dim (default: the dim most slides' headers agree on). Raises :class:`SourceError` for a
    case in two CSV splits, label variants, or no majority dim; :class:`BadSampleError` for a bad bag
    (with ``report_all``: a :class:`SourceError` listing every bad bag). ``no_labels``: no labels at
    all (``classes``, if given, names the classes of the model that will predict). :class:`~aem_dist.data.shards.DatasetExists`
    when ``out`` already holds a dataset and ``overwrite`` is False (the CLI's default; checked before any slide is read)."""
    from ..progress import progress as progress_bar

    check_output(out, options, overwrite)
    source = open_source(fmt, src, limits)
    skipped: Counter = Counter()
    problems: list[BadSampleError] = []

    def bad(err: BadSampleError) -> None:
        if on_bad != "skip":
            if report_all:
                problems.append(err)
                return
            raise err
        skipped[err.reason] += 1
        log.warning("ingest: skipping %s", err)

    try:
        source_ids = source.slide_ids()
        if no_labels and (labels_csv or case_column or label_map):
            raise SourceError("--no-labels ingests every slide without a label: it takes no --labels, --case-column or --label-map")
        if labels_csv:
            rows = read_labels(labels_csv, case_column)
            matched = match_ids([r.slide_id for r in rows], set(source_ids))
            for r in rows:
                if r.slide_id not in matched:
                    bad(BadSampleError("missing_features", f"{labels_csv}: slide {r.slide_id!r} has no features in {src}", key=r.slide_id))
            rows = [r for r in rows if r.slide_id in matched]
            ids = [matched[r.slide_id] for r in rows]
            labels = [r.label for r in rows]
            given_splits = [r.split for r in rows]
            cases = [r.case for r in rows] if rows and rows[0].case is not None else None
            unlabelled = len(set(source_ids) - set(ids))
            if unlabelled:
                log.info("ingest: %d slide(s) in %s are not in %s and are left out", unlabelled, src, labels_csv)
        else:
            if case_column is not None:
                raise SourceError(f"--case-column {case_column!r} needs a labels CSV (--labels)")
            ids, labels, given_splits, unlabelled, cases = [], [], [], 0, None
            for sid in source_ids:
                lab = None if no_labels else source.label_of(sid)
                if lab is None and not no_labels:
                    raise SourceError(f"{src}: format {fmt!r} carries no labels; pass --labels slide_id,label[,split] CSV")
                ids.append(sid)
                labels.append(lab)
                given_splits.append(None)
        if not ids:
            raise SourceError(f"no slide to ingest from {src}" + (f" with labels {labels_csv}" if labels_csv else ""))
        if label_map:
            labels = [label_map.get(lab, lab) for lab in labels]
        if no_labels:
            names, y = list(classes or []), [UNLABELLED] * len(ids)
        else:
            check_label_variants(ids, labels)
            names, index = class_names_for(labels, classes)
            y = [index[lab] for lab in labels]
        if no_labels:
            split_of, how = dict.fromkeys(ids, "test"), "none: unlabelled (--no-labels), every slide in test"
        elif all(s is not None for s in given_splits):
            if cases is not None:
                check_case_splits(cases, given_splits, labels_csv or src)
            split_of = dict(zip(ids, given_splits))
            how = "from the labels CSV"
        else:
            split_of = grouped_stratified_split(ids, y, cases, val_frac=val_frac, test_frac=test_frac, seed=seed)
            how = f"stratified{' by case' if cases is not None else ''}, seed {seed}, val {val_frac}, test {test_frac}"
        label_of = dict(zip(ids, y))
        rng = np.random.default_rng([seed, 0x1A6E57])
        order = [(split, sid) for split in ("train", "val", "test") for sid in rng.permutation(sorted(i for i in ids if split_of[i] == split)).tolist()]

        source_meta: dict[str, Any] = {"format": fmt, "src": storage.redact(src, options), "labels": labels_csv, "split": how, "seed": seed}
        if no_labels:
            source_meta["unlabelled"] = True
        if label_map:
            source_meta["label_map"] = dict(label_map)
        if cases is not None:
            case_of = dict(zip(ids, cases))
            source_meta["cases"] = {
                "column": case_column or "case_id",
                "n_cases": {sp: len({case_of[i] for i in ids if split_of[i] == sp}) for sp in ("train", "val", "test")},
                "case_of": case_of,
            }
        dim, dim_why = consensus_dim(source, ids, dim)
        writer: DatasetWriter | None = None
        no_coords: list[str] = []  # slides whose source has no patch coordinates: no heatmap can place their attention
        try:
            with progress_bar(len(order), f"ingest {fmt}", "bag", disable=not progress) as bar:
                for split, sid in order:
                    bar.update(1)
                    try:
                        bag = to_bag(source.load(sid), label_of[sid], dim, dim_why)
                    except BadSampleError as err:
                        bad(err)
                        continue
                    if writer is None:
                        writer = DatasetWriter(out, dim, names, options=options, shard_bytes=shard_bytes, source=source_meta, overwrite=overwrite)
                    if bag.coords is None:
                        no_coords.append(sid)
                    writer.add(split, bag)
            if problems:
                shown = "\n  ".join(str(p) for p in problems)
                raise SourceError(f"{len(problems)} bad slide(s) in {src}:\n  {shown}")
            if writer is None:
                raise SourceError(f"every slide from {src} was skipped: {dict(skipped)}")
            writer.source["skipped"] = dict(skipped)
            writer.source["missing_coords"] = len(no_coords)
            if no_coords:
                shown = ", ".join(repr(s) for s in no_coords[:5]) + (f" and {len(no_coords) - 5} more" if len(no_coords) > 5 else "")
                log.warning("ingest: %d of %d slide(s) from %s have no patch coordinates (%s): they train and predict as usual, but heatmaps "
                            "cannot place their attention (counted in the manifest as source.missing_coords)", len(no_coords), len(order), src, shown)
            manifest = writer.close()
        except BaseException:
            if writer is not None and writer.manifest is None:
                writer.abort()
            raise
    finally:
        source.close()
    return IngestResult(manifest, skipped, unlabelled)


def consensus_dim(source: Any, ids: list[str], given: int | None = None) -> tuple[int | None, str]:
    """The dataset's feature dim and why, decided before any slide is accepted.

    ``given`` wins. Otherwise every slide's dim is read — from the file header where the source can
    (``source.dim_of``), else by loading the slide — and the dim most slides share is the dataset's,
    so the odd slides are the ones reported, whichever is read first. Unreadable slides are left to
    the main pass to report. Raises :class:`SourceError` when no dim has a strict majority over the
    runner-up (pass ``--dim``).
    """
    if given is not None:
        return given, " (--dim)"
    counts: Counter = Counter()
    for sid in ids:
        try:
            d = source.dim_of(sid) if hasattr(source, "dim_of") else int(np.asarray(source.load(sid).feats).shape[1])
        except (SourceError, BadSampleError, IndexError):
            continue
        counts[d] += 1
    if not counts:
        return None, ""
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        shown = ", ".join(f"{n} slide(s) of dim {d}" for d, n in ranked)
        raise SourceError(f"slides disagree on the feature dim with no majority ({shown}); pass --dim")
    d, n = ranked[0]
    if len(ranked) > 1:
        log.warning("ingest: feature dim %d (%d of %d slides); %s", d, n, sum(counts.values()), ", ".join(f"{m} slide(s) of dim {o}" for o, m in ranked[1:]))
    return d, f" (the dim of {n} of {sum(counts.values())} slides)"
