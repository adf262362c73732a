"""A run folder belongs to one configuration.

Re-running ``train`` with the same ``--out`` resumes from the latest checkpoint. That is only honest
when the configuration is the one the checkpoints were trained with: a changed ``loss.lam`` would
"resume" a model trained with the old λ and record the new one in ``results.json``; a raised
``train.epochs`` would continue on a cosine schedule that has already reached lr 0 (the schedule's
length is fixed by ``train.epochs``). So a resume compares the recorded config with the new one and
refuses when anything that changes the result differs.

Keys that may differ between a run and its resume (they change how, where or how visibly a run
executes, not its numbers): ``train.progress``, ``train.device``, the loader's worker/prefetch/cache/
retry settings, ``scaling.use_gpu`` and ``scaling.resources_per_worker``, and the ``run``, ``sweep``,
``metrics``, ``storage`` and ``debug`` sections. ``scaling.num_workers`` 0 and 1 are the same world
(one rank). Everything else — data, model, loss, train (epochs included), the world size — must match.
A key only one side has (a config written by another version) is not compared.
"""

from __future__ import annotations

from typing import Any

ALLOWED_TO_DIFFER = (
    "train.progress",
    "train.device",
    "data.num_workers",
    "data.prefetch",
    "data.cache_dir",
    "data.cache_max_gb",
    "data.retries",
    "scaling.use_gpu",
    "scaling.resources_per_worker",
    "run.",
    "sweep.",
    "metrics.",
    "mlflow.",
    "storage.",
    "debug.",
)


class RunConfigMismatch(ValueError):
    """A run folder holds progress of a different configuration; the message lists the differing keys."""


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"loss": {"lam": 0.1}}`` → ``{"loss.lam": 0.1}`` (dict leaves only; lists stay values)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and value and not (prefix + key).startswith("scaling.resources_per_worker"):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _relevant(key: str) -> bool:
    return not any(key == a or (a.endswith(".") and key.startswith(a)) for a in ALLOWED_TO_DIFFER)


def _normalise(flat: dict[str, Any]) -> dict[str, Any]:
    if "scaling.num_workers" in flat and isinstance(flat["scaling.num_workers"], int):
        flat["scaling.num_workers"] = max(1, flat["scaling.num_workers"])  # 0 (in-process) = one rank
    return flat


def result_relevant_diff(old_cfg: dict[str, Any], new_cfg: dict[str, Any]) -> list[str]:
    """Dotted keys, sorted, whose values differ between two plain config dicts and change the result."""
    old, new = _normalise(flatten(old_cfg)), _normalise(flatten(new_cfg))
    return sorted(k for k in old.keys() & new.keys() if _relevant(k) and old[k] != new[k])


START_OVER = "pass --force-new to start over there, or choose another --out"


def mismatch_message(where: str, old_cfg: dict[str, Any], new_cfg: dict[str, Any], keys: list[str], start_over: str = START_OVER) -> str:
    """One line: where, each differing key with old → new, and how to start over."""
    old, new = _normalise(flatten(old_cfg)), _normalise(flatten(new_cfg))
    parts = ", ".join(f"{k} {old[k]!r} → {new[k]!r}" for k in keys)
    hint = " (train.epochs fixes the length of the lr schedule the checkpoints were trained on)" if "train.epochs" in keys else ""
    return f"{where} holds a run with a different config: {parts}{hint}; {start_over}"


def check_same_run(old_cfg: dict[str, Any] | None, new_cfg: dict[str, Any], where: str, start_over: str = START_OVER) -> None:
    """Raise :class:`RunConfigMismatch` if ``old_cfg`` (None: nothing recorded) differs in a result-relevant key."""
    if old_cfg is None:
        return
    keys = result_relevant_diff(old_cfg, new_cfg)
    if keys:
        raise RunConfigMismatch(mismatch_message(where, old_cfg, new_cfg, keys, start_over))


def recorded_config(out: str, options: Any = None) -> dict[str, Any] | None:
    """The config in ``out/run.json`` (written by the run or sweep that owns ``out``), or None."""
    from .. import storage

    record = storage.read_record(storage.join(out, "run.json"), options, what="run record (run.json)")
    return record.get("config") if record is not None else None
