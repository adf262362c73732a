"""``manifest.json``: what a dataset holds, so loaders can plan epochs without listing storage.

The manifest is written last; a dataset exists only once its manifest does.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, model_validator

from .. import storage
from ..storage import StorageOptions
from .limits import Limits
from .schema import UNLABELLED

FORMAT = "aem-dist/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
# A shard name is one plain path segment: it is joined onto the dataset root, so '/', '..', a leading
# '.' or '-', backslashes and control characters would read outside it or reach a terminal.
SHARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,254}")
BAG_KEY = re.compile(r"[A-Za-z0-9_-]{1,255}")  # what schema.safe_key produces
MAX_MANIFEST_BYTES = 256 << 20  # ~80 bytes per bag as written: a million bags with folds and cases fit
VALUES_PER_BAG = 16  # JSON values a bag adds at most: its row (3), its case (1), one per fold (k <= 12)


class ManifestError(ValueError):
    """manifest.json is missing or invalid; the message names the file and field."""


class BagEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str
    label: int = Field(ge=UNLABELLED, description="class index; -1: unlabelled (ingest --no-labels)")
    n: int = Field(ge=0, description="instances")

    @classmethod
    def from_list(cls, row: Any) -> "BagEntry":
        return cls(key=row[0], label=row[1], n=row[2])


class ShardEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    n_bags: int = Field(ge=0)
    n_instances: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bags: list[BagEntry]
    # In a fold view (aem_dist.data.folds.fold_view) a shard lists only the bags of one split; the keys
    # it also holds for the fold's other splits are known here so readers pass over them quietly.
    _also_holds: frozenset[str] = PrivateAttr(default_factory=frozenset)

    @model_validator(mode="before")
    @classmethod
    def _bags_as_rows(cls, data: Any) -> Any:
        # Stored compactly as [key, label, n] rows.
        if isinstance(data, dict) and isinstance(data.get("bags"), list):
            data = {**data, "bags": [BagEntry.from_list(b) if isinstance(b, (list, tuple)) else b for b in data["bags"]]}
        return data

    @model_validator(mode="after")
    def _counts(self) -> "ShardEntry":
        if not SHARD_NAME.fullmatch(self.name) or ".." in self.name:
            raise ValueError(f"shard name {self.name!r} is not a plain file name (one path segment: letters, digits, '.', '_', '-')")
        for bag in self.bags:
            if not BAG_KEY.fullmatch(bag.key):
                raise ValueError(f"shard {self.name}: bag key {bag.key!r} is not a safe key (letters, digits, '_', '-')")
        if len(self.bags) != self.n_bags:
            raise ValueError(f"shard {self.name}: n_bags {self.n_bags} != {len(self.bags)} listed bags")
        if sum(b.n for b in self.bags) != self.n_instances:
            raise ValueError(f"shard {self.name}: n_instances {self.n_instances} != sum over listed bags")
        return self


class SplitEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_bags: int = Field(ge=0)
    n_instances: int = Field(ge=0)
    class_counts: list[int]
    shards: list[ShardEntry]

    def bags(self) -> list[BagEntry]:
        return [b for s in self.shards for b in s.bags]


class FoldSplits(BaseModel):
    """One cross-validation fold: the bag keys of each split."""

    model_config = ConfigDict(extra="forbid")
    train: list[str]
    val: list[str]
    test: list[str]


class Folds(BaseModel):
    """K cross-validation assignments of the dataset's bags (shards untouched; see aem_dist.data.folds)."""

    model_config = ConfigDict(extra="forbid")
    k: int = Field(ge=2)
    seed: int
    val_frac: float = Field(ge=0.0, lt=1.0)
    stratify: bool
    grouped_by: str | None = Field(None, description="what keeps slides together (the manifest's case column); None: one bag per group")
    folds: list[FoldSplits]


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: str
    dim: int = Field(ge=1)
    class_names: list[str] = Field(description="at least 2; may be empty in a dataset of unlabelled bags only (ingest --no-labels)")
    splits: dict[str, SplitEntry]
    source: dict[str, Any] = Field(default_factory=dict)
    created_by: str = ""
    folds: Folds | None = None

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> "Manifest":
        if self.format != FORMAT:
            raise ValueError(f"format {self.format!r} is not {FORMAT!r}")
        # Declared sizes are checked before anything (a model, a buffer) is built from them.
        limits = (info.context or {}).get("limits") or Limits()
        limits.check_bag(0, self.dim, "the manifest")
        if len(self.class_names) < 2 and any(b.label != UNLABELLED for e in self.splits.values() for b in e.bags()):
            raise ValueError(f"class_names: {len(self.class_names)} class(es); a dataset with labels needs at least 2")
        for name in self.class_names:
            if not name.isprintable():
                raise ValueError(f"class name {name!r} holds control characters")
        n_bags = sum(len(s.bags) for entry in self.splits.values() for s in entry.shards)
        if n_bags > limits.max_bags:
            raise ValueError(f"lists {n_bags:,} bags, more than a dataset may hold ({limits.max_bags:,})")
        seen: set[str] = set()
        for split, entry in self.splits.items():
            if len(entry.class_counts) != self.n_classes:
                raise ValueError(f"splits.{split}.class_counts has {len(entry.class_counts)} entries for {self.n_classes} classes")
            for bag in entry.bags():
                if bag.label >= self.n_classes:
                    raise ValueError(f"splits.{split}: bag {bag.key!r} label {bag.label} outside {self.n_classes} classes")
                limits.check_bag(bag.n, None, f"splits.{split}: bag {bag.key!r}")
                if bag.key in seen:
                    raise ValueError(f"splits.{split}: duplicate key {bag.key!r}")
                seen.add(bag.key)
        if self.folds is not None:
            self._check_folds(seen)
        return self

    def _check_folds(self, keys: set[str]) -> None:
        f = self.folds
        assert f is not None
        if len(f.folds) != f.k:
            raise ValueError(f"folds: k is {f.k} but {len(f.folds)} folds are listed")
        tested: set[str] = set()
        for i, fold in enumerate(f.folds):
            parts = (fold.train, fold.val, fold.test)
            listed = [key for part in parts for key in part]
            if len(listed) != len(set(listed)) or set(listed) != keys:
                raise ValueError(f"folds.folds.{i}: train/val/test must hold every bag of the dataset exactly once")
            if not fold.train or not fold.test:
                raise ValueError(f"folds.folds.{i}: empty train or test split")
            if tested & set(fold.test):
                raise ValueError(f"folds.folds.{i}: a bag is in the test split of two folds")
            tested |= set(fold.test)
        if tested != keys:
            raise ValueError("folds: some bags are in no fold's test split")

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def n_unlabelled(self, split: str) -> int:
        """Bags of ``split`` without a label (``ingest --no-labels``): they can be predicted, not trained or scored on."""
        return sum(b.label == UNLABELLED for b in self.split(split).bags())

    def split(self, name: str) -> SplitEntry:
        if name not in self.splits:
            raise ManifestError(f"dataset has no split {name!r} (has {sorted(self.splits)})")
        return self.splits[name]

    def to_json(self) -> str:
        data = self.model_dump(mode="json")
        for entry in data["splits"].values():
            for shard in entry["shards"]:
                shard["bags"] = [[b["key"], b["label"], b["n"]] for b in shard["bags"]]
        if data["folds"] is None:
            del data["folds"]  # a dataset without folds keeps the manifest it always had
        return json.dumps(data, indent=1, sort_keys=False)


def class_counts(labels: Any, n_classes: int) -> list[int]:
    """Bags per class; unlabelled bags (:data:`~aem_dist.data.schema.UNLABELLED`) count in no class."""
    counts = [0] * n_classes
    for label in labels:
        if label != UNLABELLED:
            counts[label] += 1
    return counts


def check_entry_count(text: str | bytes, limits: Limits, where: str) -> None:
    """Refuse a manifest that holds more JSON values than a dataset of ``limits.max_bags`` bags can,
    before it is parsed: parsing materialises every value (10^7 bag rows took 7 GB and a minute).
    The count is of commas — one per value in a list or object, found at C speed without parsing."""
    values = (text.encode() if isinstance(text, str) else text).count(b",") + 1
    allowed = VALUES_PER_BAG * limits.max_bags + 10_000
    if values > allowed:
        raise ManifestError(f"{where}: holds about {values:,} entries, more than a manifest of at most {limits.max_bags:,} bags can ({allowed:,})")


def parse_manifest(text: str | bytes, where: str = MANIFEST, limits: Limits | None = None) -> Manifest:
    """Validate a manifest (counts, names, sizes within ``limits``); raises ManifestError naming the field."""
    check_entry_count(text, limits or Limits(), where)
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{where}: not valid JSON: {err}") from None
    except RecursionError:
        raise ManifestError(f"{where}: not valid JSON: nested too deeply") from None
    try:
        return Manifest.model_validate(data, context={"limits": limits})
    except ValidationError as err:
        parts = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            parts.append(f"{loc or '<root>'}: {str(e['msg']).removeprefix('Value error, ')}")
        raise ManifestError(f"{where}: invalid manifest: " + "; ".join(parts)) from None


def load_manifest(root: str, options: StorageOptions | None = None, limits: Limits | None = None) -> Manifest:
    """Read and validate ``<root>/manifest.json`` (sizes against ``limits``, default :class:`Limits`)."""
    url = storage.join(root, MANIFEST)
    try:
        text = storage.read_bytes(url, options, cap=MAX_MANIFEST_BYTES, what="manifest")
    except FileNotFoundError:
        raise ManifestError(f"{storage.redact(url, options)}: no manifest (not a dataset, or its writing never finished)") from None
    except (storage.NotRegularFile, storage.FileTooLarge) as err:
        raise ManifestError(str(err)) from None
    return parse_manifest(text, storage.redact(url, options), limits)
