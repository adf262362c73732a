"""Classic MIL CSV (the Musk / Elephant layout): one row per instance — bag label, bag id, features…

A header row is recognised (its feature columns are not numbers) and skipped. Every row of a bag
must carry the same label. The file is small by nature (classic MIL benchmarks), so it is read once.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict

import numpy as np

from ... import storage
from . import RawBag, SourceError, label_text

MAX_CSV_BYTES = 1 << 30  # classic MIL benchmarks are megabytes; the file is held in memory whole


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class MilCsvSource:
    fmt = "mil-csv"

    def __init__(self, path: str):
        self.path = path
        rows: dict[str, list[list[float]]] = defaultdict(list)
        labels: dict[str, str] = {}
        dim = None
        try:
            text = storage.read_bytes(path, cap=MAX_CSV_BYTES, what="MIL CSV").decode("utf-8", errors="replace")
        except (storage.StorageError, OSError) as err:
            raise SourceError(f"{path}: cannot read: {err}") from None
        try:
            with io.StringIO(text, newline="") as f:
                for line_no, row in enumerate(csv.reader(f), start=1):
                    if not row or all(not c.strip() for c in row):
                        continue
                    if line_no == 1 and not all(_is_number(c) for c in row[2:]):
                        continue  # header
                    if len(row) < 3:
                        raise SourceError(f"{path}:{line_no}: need label, bag id and at least one feature, got {len(row)} columns")
                    label, bag = label_text(row[0]), row[1].strip()
                    if dim is None:
                        dim = len(row) - 2
                    if len(row) - 2 != dim:
                        raise SourceError(f"{path}:{line_no}: {len(row) - 2} features, earlier rows have {dim}")
                    try:
                        rows[bag].append([float(c) for c in row[2:]])
                    except ValueError as err:
                        raise SourceError(f"{path}:{line_no}: feature is not a number: {err}") from None
                    if labels.setdefault(bag, label) != label:
                        raise SourceError(f"{path}:{line_no}: bag {bag!r} has rows labelled {labels[bag]!r} and {label!r}")
        except OSError as err:
            raise SourceError(f"{path}: cannot read: {err}") from None
        if not rows:
            raise SourceError(f"{path}: no instance rows")
        self._rows = rows
        self._labels = labels

    def slide_ids(self) -> list[str]:
        return sorted(self._rows)

    def label_of(self, slide_id: str) -> str | None:
        return self._labels[slide_id]

    def load(self, slide_id: str) -> RawBag:
        return RawBag(slide_id, np.asarray(self._rows[slide_id], dtype=np.float32), None, self._labels[slide_id], f"{self.path} (bag {slide_id})")

    def close(self) -> None:
        pass
