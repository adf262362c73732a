"""What ``aem-dist predict`` hands to people: ``predictions.csv`` per slide, and the ensemble of a sweep.

* :func:`predictions_csv` — one row per slide: ``slide_id``, ``case_id`` (from the dataset's manifest,
  empty when it records no cases), ``split``, ``label`` (empty for unlabelled slides), one
  ``p_<class>`` column per class (softmax probability) and ``predicted`` (the class name of the argmax).
* :func:`ensemble_members` / :func:`ensemble` — ``predict --ensemble``: the trials of the λ the sweep
  chose by validation (every seed, and fold, of that summary row), each predicting the same bags; a
  slide's probabilities are the **mean of the members' probabilities**, its attention the mean of their
  attention (still summing to 1 per bag); the predicted class is the argmax of the mean.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Sequence

import numpy as np

from .. import storage
from ..data.schema import UNLABELLED
from ..storage import StorageOptions
from .attention import BagResult



def has_labels(bags: Sequence[BagResult]) -> bool:
    return any(b.label != UNLABELLED for b in bags)


HEADER_START = "slide_id,case_id,split,label,"


def check_table_output(url: str, options: StorageOptions | None = None) -> None:
    """Refuse to replace a file at ``url`` that is not a predictions.csv (its first line says so):
    predict never overwrites what it did not write. Raises ValueError naming the file."""
    try:
        head = storage.read_bytes(url, options, cap=storage.MAX_SMALL_FILE_BYTES, what="predictions.csv")[: len(HEADER_START)]
    except FileNotFoundError:
        return
    except storage.StorageError as err:
        raise ValueError(f"--csv {storage.redact(url, options)}: {err}") from None
    if head != HEADER_START.encode():
        raise ValueError(f"--csv {storage.redact(url, options)}: a file that is not a predictions.csv is there; predict never replaces what it did not write "
            f"(give --csv another path)")


def predictions_csv(bags: Sequence[BagResult], class_names: Sequence[str], case_of: Mapping[str, str] | None = None) -> str:
    """The per-slide CSV (see the module docstring); probabilities with 6 decimals."""
    names = [str(c) for c in class_names] or [str(i) for i in range(len(bags[0].probs))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "case_id", "split", "label", *(f"p_{c}" for c in names), "predicted"])
    for b in bags:
        probs = np.asarray(b.probs, dtype=np.float64)
        label = names[b.label] if 0 <= b.label < len(names) else ""
        w.writerow([b.slide_id, (case_of or {}).get(b.slide_id, ""), b.split, label, *(f"{p:.6f}" for p in probs), names[int(np.argmax(probs))]])
    return buf.getvalue()


def case_of(manifest: Any) -> dict[str, str]:
    """slide id → case id, as ingest recorded it (``manifest.source.cases.case_of``); {} without cases."""
    cases = (getattr(manifest, "source", None) or {}).get("cases") or {}
    return {str(k): str(v) for k, v in (cases.get("case_of") or {}).items()}


def accuracy_line(bags: Sequence[BagResult]) -> str:
    """'accuracy 0.912 on 48 labelled slides', or '' when no slide has a label (nothing to score)."""
    labelled = [b for b in bags if b.label != UNLABELLED]
    if not labelled:
        return ""
    acc = sum(int(np.argmax(b.probs) == b.label) for b in labelled) / len(labelled)
    return f"accuracy {acc:.3f} on {len(labelled)} labelled slide{'s' if len(labelled) != 1 else ''}"


def ensemble_members(sweep: str, options: StorageOptions | None = None) -> tuple[list[str], str]:
    """Trial folders of the sweep's chosen summary row (all its finished seeds and folds) and a label
    ('loss.lam = 0.01: 3 trials'). ValueError when the sweep has no chosen row or no finished trial in it."""
    from .report import load_sweep

    where = storage.redact(sweep, options)
    s = load_sweep(sweep, options)
    chosen = [r for r in s.summary if str(r.get("chosen")) == "True" or r.get("chosen") is True]
    if not chosen:
        raise ValueError(f"{where}: no λ was chosen (summary.csv has no chosen row): nothing to ensemble")
    if len(chosen) > 1:
        rows = "; ".join(", ".join(f"{k} = {r.get(k)}" for k in s.group_keys) for r in chosen)
        raise ValueError(f"{where}: {len(chosen)} rows were chosen ({rows}), one per value of the other swept keys: ensemble one sweep of λ at a time")
    row = chosen[0]

    def same(t: Mapping[str, Any]) -> bool:
        return all(_equal(t.get(k), row.get(k)) for k in s.group_keys)

    names = [str(t["trial"]) for t in s.trials if t.get("status") == "TERMINATED" and same(t)]
    if not names:
        raise ValueError(f"{where}: the chosen row has no finished trial")
    label = ", ".join(f"{k} = {row.get(k)}" for k in s.group_keys) or "the chosen row"
    return [s.paths[n] for n in names], f"{label}: {len(names)} trial{'s' if len(names) != 1 else ''}"


def _equal(a: Any, b: Any) -> bool:
    """Swept values as trials.csv and summary.csv read back (0 and 0.0 are the same λ)."""
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return str(a) == str(b)


def ensemble(per_member: Sequence[Sequence[BagResult]]) -> list[BagResult]:
    """The members' predictions of the same bags combined: mean probabilities (float64, stored float32)
    and mean attention per bag; bags in the first member's order. ValueError if members saw other bags."""
    first = per_member[0]
    by_key = [{b.key: b for b in bags} for bags in per_member]
    for k, bags in enumerate(by_key[1:], start=1):
        if set(bags) != {b.key for b in first}:
            raise ValueError(f"ensemble member {k} predicted other bags than member 0 ({len(bags)} vs {len(first)})")
    out = []
    for b in first:
        members = [m[b.key] for m in by_key]
        probs = np.mean([np.asarray(m.probs, dtype=np.float64) for m in members], axis=0)
        attention = np.mean([np.asarray(m.attention, dtype=np.float64) for m in members], axis=0)
        out.append(BagResult(b.slide_id, b.key, b.split, b.label, probs.astype(np.float32), attention.astype(np.float32), b.coords, b.tumour, None))
    return out
