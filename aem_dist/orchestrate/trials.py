"""What names a trial and what it reports: the bottom floor of orchestrate (no Ray, no other orchestrate module).

Trial, sample and population names, the keys of a trial's reports, the files a trial leaves beside its
results.json, and the one decoder of a Tune trial's config into the grid points (or the drawn point) it trains.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

SCORE_KEY = "best/val_score"  # reported every epoch (engine.loop.EpochReport.flat) and in a trial's final report
PROGRESS_KEY = "progress/epochs"  # epochs done: ASHA's time attribute; absent from the last epoch's report
SEARCH_FILE = "search.json"
STOPPED_FILE = "stopped.json"
POPULATION = "_population"  # the Tune config key of a grid trial: its population (PopulationSpec.as_config)


def trial_name(values: dict[str, Any]) -> str:
    """A stable, readable, path-safe name for a trial: 'lam=0.1_seed=0' (no timestamps, so runs resume)."""
    if not values:
        return "run"
    leaves = [k.rsplit(".", 1)[-1] for k in values]
    parts = []
    for key, value in sorted(values.items()):
        leaf = key.rsplit(".", 1)[-1]
        parts.append(f"{leaf if leaves.count(leaf) == 1 else key}={value}")
    return re.sub(r"[^A-Za-z0-9_.=-]", "-", "_".join(parts))


def sample_name(index: int, values: dict[str, Any]) -> str:
    """'s003_lam=0.00123_lr=0.0004': the index keeps names unique, the rounded values make them readable."""
    return f"s{index:03d}_{trial_name({k: float(f'{v:.4g}') if isinstance(v, float) else v for k, v in values.items()})}"


def plain(value: Any) -> Any:
    """A value Tune drew (a numpy scalar) as plain Python, as search.json and a trial's values hold it."""
    return value.item() if isinstance(value, np.generic) else value


def progress_metrics(metrics: dict[str, Any], epoch: int, epochs: int) -> dict[str, Any]:
    """``metrics`` of epoch ``epoch`` (0-based) with :data:`PROGRESS_KEY` — except at the last epoch."""
    if epoch + 1 < epochs:
        metrics[PROGRESS_KEY] = epoch + 1
    return metrics


def stall_if_asked(stall_at: int | None, epoch: int) -> None:
    """``debug.stall_at_epoch``: stop for good, idle, after epoch ``epoch``'s report and checkpoint (a hung
    worker, for the stall watchdog's test and demos; a resumed run starts after it). Returns at once otherwise."""
    while stall_at is not None and epoch == stall_at:
        time.sleep(3600)


@dataclass
class Member:
    name: str  # the grid point's trial name: its folder trials/<name>
    values: dict[str, Any]  # its grid values (dotted keys)


@dataclass
class PopulationSpec:
    name: str
    members: list[Member]

    def as_config(self) -> dict[str, Any]:
        """The Tune trial config that carries this population (plain data, no secrets)."""
        return {"name": self.name, "members": [{"name": m.name, "values": m.values} for m in self.members]}

    @classmethod
    def from_config(cls, data: dict[str, Any]) -> "PopulationSpec":
        return cls(data["name"], [Member(m["name"], dict(m["values"])) for m in data["members"]])


def population_name(members: list[Member]) -> str:
    """Named after its first member ('pop_lam=0.0_seed=0+6'); a single member keeps its own name."""
    return members[0].name if len(members) == 1 else f"pop_{members[0].name}+{len(members) - 1}"


def trial_spec(config: dict[str, Any] | None, name: str) -> PopulationSpec:
    """What a Tune trial trains, from its config: a grid trial's population (:data:`POPULATION`), else the one
    point a search drew, named ``name`` (its Tune trial name / folder), with the drawn values."""
    if (config or {}).get(POPULATION):
        return PopulationSpec.from_config(config[POPULATION])
    return PopulationSpec(name, [Member(name, {k: plain(v) for k, v in (config or {}).items()})])
