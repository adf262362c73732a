"""Data identity: which exact datasets a run or sweep read, and a refusal when one has changed since.

A dataset's identity is the sha256 of its ``manifest.json``: the manifest lists every shard with its
own sha256, sample and instance counts, so new features written to the same URL give a new digest.
``run.json`` records ``datasets`` = {data.root (credentials redacted): digest} for every dataset the run
or sweep reads (each ``data.root`` of a sweep's grid). Before a run resumes in its folder, a sweep
``--resume``s, or ``aem-dist report`` predicts with a sweep's checkpoints, :func:`check_same_data`
compares the recorded digests with the datasets as they are now and refuses a changed one in one line
naming both digests — results trained on other data would be mixed with new ones without a word.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from .. import storage
from ..engine.results import manifest_sha256
from ..storage import StorageOptions



class DataChanged(ValueError):
    """A dataset a run was trained on has another manifest now (the message names both digests)."""


def manifest_digest(root: str, options: StorageOptions | None = None) -> str | None:
    """sha256 of ``root/manifest.json``; None when there is none (yet) — what run.json records."""
    return manifest_sha256(root, options)


def dataset_digests(roots: Iterable[str], options: StorageOptions | None = None) -> dict[str, str | None]:
    """{redacted root: manifest digest} of every distinct root."""
    return {storage.redact(root, options): manifest_digest(root, options) for root in dict.fromkeys(roots)}


def recorded_digests(record: Mapping[str, Any] | None) -> dict[str, str | None]:
    """The digests a ``run.json`` recorded: ``datasets``, or the older single ``dataset`` entry."""
    if not record:
        return {}
    if isinstance(record.get("datasets"), Mapping):
        return dict(record["datasets"])
    one = record.get("dataset") or {}
    return {one["root"]: one.get("manifest_sha256")} if one.get("root") else {}


def check_same_data(record: Mapping[str, Any] | None, roots: Iterable[str], where: str, options: StorageOptions | None = None, *,
                    start_over: str = "pass --force-new to start over there, or choose another --out") -> None:  # fmt: skip
    """Raise :class:`DataChanged` when a dataset in ``roots`` that ``record`` (a run.json) recorded has
    another manifest digest now. Datasets the record does not know (a newly swept root) pass."""
    before = recorded_digests(record)
    for root in dict.fromkeys(roots):
        shown = storage.redact(root, options)
        if shown not in before or before[shown] is None:
            continue
        now = manifest_digest(root, options)
        if now != before[shown]:
            now_text = f"has manifest sha256 {now}" if now else "has no manifest.json"
            raise DataChanged(f"{where} was trained on {shown} with manifest sha256 {before[shown]}, which now {now_text}: "
                              f"the dataset changed since; {start_over}")


def read_record(out: str, options: StorageOptions | None = None) -> dict[str, Any] | None:
    """The ``run.json`` of a run or sweep folder, or None when there is none (or it is unreadable)."""
    import json

    try:
        return json.loads(storage.read_bytes(storage.join(out, "run.json"), options))
    except (FileNotFoundError, ValueError):
        return None


def check_trained_on(record: Mapping[str, Any] | None, root: str, where: str, options: StorageOptions | None = None) -> None:
    """For ``report``: the dataset at ``root`` (perhaps moved, under another URL) must be one the run
    recorded, by digest; DataChanged otherwise. A record without digests (an older run) passes."""
    before = {d for d in recorded_digests(record).values() if d}
    if not before:
        return
    now = manifest_digest(root, options)
    if now not in before:
        now_text = f"has manifest sha256 {now}" if now else "has no manifest.json"
        raise DataChanged(f"{where} was trained on data with manifest sha256 {', '.join(sorted(before))}; {storage.redact(root, options)} {now_text}: "
                          "its predictions would not be the trained models' (pass --data with the dataset it was trained on)")
