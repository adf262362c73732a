"""Cross-validation folds recorded in a dataset's manifest, and the fold view the loaders read.

``aem-dist splits DATASET --folds K`` assigns every bag to the test split of exactly one of K folds
(stratified by class unless ``--no-stratify``; a case's slides — the manifest's ``source.cases`` from
ingest — stay in one fold), and within each fold draws a validation share ``val_frac`` from the
remaining bags (stratified and grouped the same way). The assignments go into ``manifest.json``
under ``folds`` (rewritten atomically; the fixed ``splits`` stay as they were). Shards are never
rewritten: a fold only reassigns bags.

:func:`open_manifest` is how a run reads a dataset: its manifest under the configured limits, seen
through its fold. ``data.fold: N`` makes :func:`fold_view` present fold N as an ordinary manifest whose splits list,
per shard, only that split's bags; every shard may then appear in every split. The loaders need no
other change: the memory loader reads a shard and passes over the bags of the fold's other splits,
the streaming loader reads only the bags its plan names.
"""

from __future__ import annotations

from typing import Iterable

from .. import storage
from ..config import ConfigError, DataConfig
from ..storage import StorageOptions
from .limits import Limits
from .manifest import MANIFEST, SPLITS, FoldSplits, Folds, Manifest, ShardEntry, SplitEntry, class_counts, load_manifest, parse_manifest
from .schema import UNLABELLED, safe_key
from .sources.labels import grouped_stratified_folds, grouped_stratified_split

FOLD_KEY = "data.fold"


def case_groups(manifest: Manifest) -> list[str] | None:
    """The case (patient) of every bag in manifest order, from ``source.cases.case_of`` (slide id →
    case, written by ingest); None when the dataset records no cases (each bag its own case)."""
    case_of = ((manifest.source or {}).get("cases") or {}).get("case_of")
    if not case_of:
        return None
    by_key = {safe_key(sid): str(case) for sid, case in case_of.items()}
    keys = [b.key for split in manifest.splits.values() for b in split.bags()]
    # A bag without a recorded case (should not happen) stays a case of its own.
    return [by_key.get(k, f"\x00bag:{k}") for k in keys]


def make_folds(manifest: Manifest, k: int, *, val_frac: float = 0.1, seed: int = 0, stratify: bool = True) -> Folds:
    """K folds over every bag of ``manifest`` (see module docstring). Raises SourceError when there are
    fewer cases than folds, ValueError on a bad ``val_frac``."""
    if not 0.0 <= val_frac < 1.0:
        raise ValueError(f"--val-frac {val_frac} must be in [0, 1)")
    bags = [b for split in manifest.splits.values() for b in split.bags()]
    unlabelled = sum(b.label == UNLABELLED for b in bags)
    if unlabelled:
        raise ValueError(f"{unlabelled} of {len(bags)} bags have no label (ingest --no-labels): folds are for training, which needs labels")
    keys = [b.key for b in bags]
    y = [b.label for b in bags] if stratify else [0] * len(bags)
    cases = case_groups(manifest)
    test_fold = grouped_stratified_folds(keys, y, cases, k=k, seed=seed)
    folds: list[FoldSplits] = []
    for f in range(k):
        rest = [i for i in range(len(keys)) if test_fold[i] != f]
        if val_frac > 0:
            # Seeded per fold so folds do not share one validation pattern.
            split_of = grouped_stratified_split([keys[i] for i in rest], [y[i] for i in rest], None if cases is None else [cases[i] for i in rest],
                val_frac=val_frac, test_frac=0.0, seed=seed + 1000 * (f + 1))
        else:
            split_of = {keys[i]: "train" for i in rest}
        folds.append(
            FoldSplits(
                train=[keys[i] for i in rest if split_of[keys[i]] == "train"],
                val=[keys[i] for i in rest if split_of[keys[i]] == "val"],
                test=[keys[i] for i in range(len(keys)) if test_fold[i] == f],
            )
        )
    grouped = ((manifest.source or {}).get("cases") or {}).get("column") if cases is not None else None
    return Folds(k=k, seed=seed, val_frac=val_frac, stratify=stratify, grouped_by=grouped, folds=folds)


def record_folds(root: str, k: int, *, val_frac: float = 0.1, seed: int = 0, stratify: bool = True, options: StorageOptions | None = None) -> Manifest:
    """Compute K folds for the dataset at ``root`` and rewrite its manifest atomically with them
    (replacing folds recorded before; the fixed splits are kept). Returns the new manifest."""
    manifest = load_manifest(root, options)
    folds = make_folds(manifest, k, val_frac=val_frac, seed=seed, stratify=stratify)
    url = storage.join(root, MANIFEST)
    text = manifest.model_copy(update={"folds": folds}).to_json()
    new = parse_manifest(text, storage.redact(url, options))  # validated before it replaces the old one
    storage.atomic_write_text(url, text, options)
    return new


def check_folds(manifest: Manifest, folds: Iterable[int | None], where: str = "the dataset") -> None:
    """Raise :class:`ConfigError` naming ``data.fold`` for the first fold in ``folds`` that ``manifest``
    does not record (None = the fixed splits, always fine). Drivers call it before starting workers."""
    for fold in dict.fromkeys(folds):
        if fold is None:
            continue
        if manifest.folds is None:
            raise ConfigError(f"{FOLD_KEY}={fold}: {where} records no cross-validation folds; add them with `aem-dist splits DATASET --folds K` (or set "
                f"{FOLD_KEY}: null for the fixed splits)")
        k = manifest.folds.k
        if not 0 <= fold < k:
            raise ConfigError(f"{FOLD_KEY}={fold}: {where} has {k} folds (0..{k - 1})")


def open_manifest(data: DataConfig, options: StorageOptions | None = None, root: str | None = None) -> Manifest:
    """The dataset as a run reads it: ``root`` (default ``data.root``) read with the limits of ``data``
    (``data.max_instances_per_bag``, ``data.max_dim``; sizes and entry counts checked before anything
    is built from them) and viewed as fold ``data.fold`` splits it. The one way engine and observe
    code opens a manifest. Raises ManifestError, or ConfigError for a fold the dataset lacks."""
    root = str(data.root if root is None else root)
    manifest = load_manifest(root, options, Limits.from_config(data))
    return fold_view(manifest, data.fold, storage.redact(root, options))


def fold_view(manifest: Manifest, fold: int | None, where: str = "the dataset") -> Manifest:
    """The manifest as fold ``fold`` splits it (``fold`` None: ``manifest`` itself, its fixed splits).

    Each split lists, shard by shard in manifest order, only the bags the fold assigns to it; a split
    the fold leaves empty (no validation share) is absent. Raises :class:`ConfigError` naming
    ``data.fold`` when the dataset has no folds or ``fold`` is not one of them.
    """
    if fold is None:
        return manifest
    check_folds(manifest, [fold], where)
    assert manifest.folds is not None
    chosen = manifest.folds.folds[fold]
    split_of = {key: split for split in SPLITS for key in getattr(chosen, split)}
    shards = [s for entry in manifest.splits.values() for s in entry.shards]
    splits: dict[str, SplitEntry] = {}
    for split in SPLITS:
        entries: list[ShardEntry] = []
        for s in shards:
            mine = [b for b in s.bags if split_of[b.key] == split]
            if not mine:
                continue
            entry = ShardEntry(name=s.name, n_bags=len(mine), n_instances=sum(b.n for b in mine), bytes=s.bytes, sha256=s.sha256, bags=mine)
            entry._also_holds = frozenset(b.key for b in s.bags if split_of[b.key] != split)
            entries.append(entry)
        if not entries:
            continue
        counts = class_counts((b.label for e in entries for b in e.bags), manifest.n_classes)
        splits[split] = SplitEntry(n_bags=sum(e.n_bags for e in entries), n_instances=sum(e.n_instances for e in entries), class_counts=counts, shards=entries)
    # Built from a validated manifest: no need to validate (and re-apply size limits) again.
    return Manifest.model_construct(**{**dict(manifest), "splits": splits})
