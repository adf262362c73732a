"""The labels/splits CSV (``[case_id,]slide_id,label[,split]``), class names, and the seeded split.

Slides of one case (patient) always land in one split: a ``case_id`` column (or ``--case-column``)
groups them, the stratified split is drawn over cases, and a CSV whose own split column puts one
case in two splits is an error naming it. Labels are taken as written: case or whitespace variants
of one label ('tumor', 'Tumor') are an error naming the slides unless a ``--label-map`` says what
they mean.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from dataclasses import dataclass

from ... import storage
from . import SourceError, label_text

log = logging.getLogger(__name__)

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test", "testing": "test"}
_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".svslide", ".h5", ".pt", ".zarr")


CASE_COLUMN = "case_id"
MAX_LABELS_BYTES = 64 << 20  # a few dozen bytes per slide: a million slides fit
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # would end up in the manifest, file names and terminals


def check_text(value: str, where: str, what: str) -> None:
    """A label, slide id or case from outside must be printable: a control character is refused
    here, naming where, instead of failing later in the manifest (after the shards are written)."""
    m = _CONTROL.search(value)
    if m:
        raise SourceError(f"{where}: {what} {value!r} holds a control character ({m.group()!r}); fix the file")


@dataclass
class LabelRow:
    slide_id: str
    label: str
    split: str | None
    case: str | None = None  # the case (patient) the slide belongs to; None: the slide is its own case


def read_labels(path: str, case_column: str | None = None) -> list[LabelRow]:
    """Rows of a labels CSV with a header naming ``slide_id`` and ``label`` (and optionally ``split``
    and a case column: ``case_column``, else ``case_id`` when present). A named case column that is
    missing, or an empty case, is a :class:`SourceError`."""
    try:
        data = storage.read_bytes(path, cap=MAX_LABELS_BYTES, what="labels CSV")  # a regular file of bounded size
    except (storage.StorageError, OSError) as err:
        raise SourceError(f"{path}: cannot read labels CSV: {err}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise SourceError(f"{path}: labels CSV is not UTF-8 text ({err})") from None
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.DictReader(f)
            fields = [c.strip() for c in reader.fieldnames or []]
            if "slide_id" not in fields or "label" not in fields:
                raise SourceError(f"{path}: header must name 'slide_id' and 'label' (got {fields})")
            if case_column is not None and case_column not in fields:
                raise SourceError(f"{path}: no case column {case_column!r} (header: {fields})")
            case_col = case_column or (CASE_COLUMN if CASE_COLUMN in fields else None)
            rows: list[LabelRow] = []
            seen: set[str] = set()
            for line_no, raw in enumerate(reader, start=2):
                row = {k.strip(): (v or "").strip() for k, v in raw.items() if k is not None}
                sid, label = row.get("slide_id", ""), row.get("label", "")
                if not sid:
                    raise SourceError(f"{path}:{line_no}: empty slide_id")
                if not label:
                    raise SourceError(f"{path}:{line_no}: slide {sid!r} has no label")
                check_text(sid, f"{path}:{line_no}", "slide_id")
                check_text(label, f"{path}:{line_no}", "label")
                if sid in seen:
                    raise SourceError(f"{path}:{line_no}: slide {sid!r} listed twice")
                seen.add(sid)
                case = None
                if case_col is not None:
                    case = row.get(case_col, "")
                    if not case:
                        raise SourceError(f"{path}:{line_no}: slide {sid!r} has an empty {case_col!r}")
                    check_text(case, f"{path}:{line_no}", case_col)
                split = row.get("split") or None
                if split is not None:
                    if split.lower() not in SPLIT_ALIASES:
                        raise SourceError(f"{path}:{line_no}: split {split!r} is not one of train/val/test")
                    split = SPLIT_ALIASES[split.lower()]
                rows.append(LabelRow(sid, label_text(label) or label, split, case))
    except OSError as err:
        raise SourceError(f"{path}: cannot read labels CSV: {err}") from None
    if "split" in fields and any(r.split is None for r in rows) and any(r.split for r in rows):
        missing = [r.slide_id for r in rows if r.split is None][:5]
        raise SourceError(f"{path}: the split column is empty for some slides, e.g. {missing}")
    return rows


def check_case_splits(cases: list[str], splits: list[str], where: str) -> None:
    """Raise :class:`SourceError` naming the first cases whose slides sit in more than one split."""
    seen: dict[str, set[str]] = {}
    for case, split in zip(cases, splits):
        seen.setdefault(case, set()).add(split)
    mixed = {c: sorted(s) for c, s in seen.items() if len(s) > 1}
    if mixed:
        shown = "; ".join(f"case {c!r} in {'/'.join(s)}" for c, s in sorted(mixed.items())[:5])
        raise SourceError(f"{where}: {len(mixed)} case(s) have slides in more than one split ({shown}): a patient's slides must stay in one split")


def parse_label_map(text: str | None) -> dict[str, str]:
    """``"Tumor=tumor, ITC=tumor"`` → ``{"Tumor": "tumor", "ITC": "tumor"}``."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        if "=" not in item:
            raise SourceError(f"--label-map item {item.strip()!r} is not of the form raw=class")
        raw, new = item.split("=", 1)
        out[raw.strip()] = new.strip()
    return out


def check_label_variants(slide_ids: list[str], labels: list[str]) -> None:
    """Raise :class:`SourceError` when labels differ only by letter case or whitespace ('tumor',
    'Tumor', 'tumor ') — almost always a typo that would silently become a class of its own."""
    groups: dict[str, dict[str, list[str]]] = {}
    for sid, lab in zip(slide_ids, labels):
        check_text(lab, f"slide {sid!r}", "label")  # labels a source file carries (acmil/zarr attrs) too
        groups.setdefault(" ".join(lab.split()).casefold(), {}).setdefault(lab, []).append(sid)
    clashes = {k: v for k, v in groups.items() if len(v) > 1}
    if clashes:
        parts = []
        for variants in clashes.values():
            parts.append(", ".join(f"{lab!r} (slides {', '.join(ids[:3])}{', …' if len(ids) > 3 else ''})" for lab, ids in sorted(variants.items())))
        raise SourceError(f"labels that differ only by case or whitespace: {'; '.join(parts)}; fix the labels or map them with --label-map 'Tumor=tumor'")


def match_ids(csv_ids: list[str], source_ids: set[str]) -> dict[str, str]:
    """CSV slide id → source slide id; 'slide_1.svs' in the CSV matches a 'slide_1' source file."""
    out = {}
    for sid in csv_ids:
        if sid in source_ids:
            out[sid] = sid
            continue
        for suffix in _SUFFIXES:
            if sid.lower().endswith(suffix) and sid[: -len(suffix)] in source_ids:
                out[sid] = sid[: -len(suffix)]
                break
    return out


def _int_like(text: str) -> bool:
    try:
        return str(int(text)) == text
    except ValueError:
        return False


def class_names_for(labels: list[str], given: list[str] | None = None) -> tuple[list[str], dict[str, int]]:
    """Class names and the label → index map.

    With ``given`` names, labels may be those names or integer indices into them. Otherwise integer
    labels sort numerically ('-1' < '1'), names sort alphabetically; the index is the position.
    """
    uniq = sorted(set(labels))
    if given:
        index = {name: i for i, name in enumerate(given)}
        for lab in uniq:
            if lab not in index:
                if _int_like(lab) and 0 <= int(lab) < len(given):
                    index[lab] = int(lab)
                else:
                    raise SourceError(f"label {lab!r} is not one of the classes {given}")
        names = list(given)
    else:
        names = sorted(uniq, key=int) if all(_int_like(x) for x in uniq) else uniq
        index = {name: i for i, name in enumerate(names)}
    if len(names) < 2:
        raise SourceError(f"need at least two classes, found {names}; name them with --classes")
    return names, index


def grouped_stratified_split(ids: list[str], y: list[int], cases: list[str] | None, *, val_frac: float, test_frac: float, seed: int) -> dict[str, str]:
    """:func:`stratified_split` over cases: every case's slides land in one split. A case's class for
    stratification is its most frequent slide label (ties: the higher class index, usually the
    positive one). ``cases`` None: every slide is its own case. Fractions count cases."""
    if cases is None:
        return stratified_split(ids, y, val_frac=val_frac, test_frac=test_frac, seed=seed)
    by_case: dict[str, list[int]] = {}
    for case, label in zip(cases, y):
        by_case.setdefault(case, []).append(label)
    case_ids = sorted(by_case)
    case_y = [max(set(by_case[c]), key=lambda lab, c=c: (by_case[c].count(lab), lab)) for c in case_ids]
    split_of_case = stratified_split(case_ids, case_y, val_frac=val_frac, test_frac=test_frac, seed=seed)
    return {sid: split_of_case[case] for sid, case in zip(ids, cases)}


def grouped_stratified_folds(ids: list[str], y: list[int], cases: list[str] | None, *, k: int, seed: int) -> list[int]:
    """Cross-validation fold (0..k-1) of every slide, stratified by class, a case's slides in one fold
    (scikit-learn's ``StratifiedGroupKFold``, shuffled with ``seed``). ``cases`` None: one case per slide.
    Raises :class:`SourceError` when there are fewer cases than folds."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    groups = list(cases) if cases is not None else list(ids)
    if len(set(groups)) < k:
        raise SourceError(f"{k} folds need at least {k} cases, found {len(set(groups))}")
    fold = [0] * len(ids)
    # One slide per case: StratifiedKFold, whose folds hold every class to within one bag
    # (StratifiedGroupKFold's greedy assignment does not promise that).
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed) if cases is None else StratifiedGroupKFold(n_splits=k, shuffle=True,
        random_state=seed)
    for f, (_, held) in enumerate(splitter.split(ids, y, groups if cases is not None else None)):
        for i in held:
            fold[int(i)] = f
    return fold


def stratified_split(ids: list[str], y: list[int], *, val_frac: float, test_frac: float, seed: int) -> dict[str, str]:
    """Seeded split stratified by class (sklearn): test first, then val from the rest."""
    from sklearn.model_selection import train_test_split

    if not 0 <= test_frac < 1 or not 0 <= val_frac < 1 or val_frac + test_frac >= 1:
        raise SourceError(f"val fraction {val_frac} and test fraction {test_frac} must be in [0, 1) and sum below 1")

    def cut(items: list[str], labels: list[int], frac: float) -> tuple[list[str], list[str], list[int]]:
        if frac <= 0 or len(items) < 2:
            return items, [], labels
        try:
            keep, take, y_keep, _ = train_test_split(items, labels, test_size=frac, stratify=labels, random_state=seed)
        except ValueError as err:  # a class too small to stratify: fall back to a plain seeded split
            log.warning("stratified split impossible (%s); using an unstratified seeded split", err)
            keep, take, y_keep, _ = train_test_split(items, labels, test_size=frac, random_state=seed)
        return list(keep), list(take), list(y_keep)

    rest, test, y_rest = cut(list(ids), list(y), test_frac)
    train, val, _ = cut(rest, y_rest, val_frac / (1 - test_frac) if val_frac else 0.0)
    return {**{i: "train" for i in train}, **{i: "val" for i in val}, **{i: "test" for i in test}}
