"""Which grid points of a sweep train together: populations (fused trials).

Grid points whose configs differ only in :data:`~aem_dist.engine.population.MEMBER_KEYS` and share
their data seed fuse into one population — one Tune trial that trains every member on the same
batches (see :mod:`aem_dist.engine.population`). ``sweep.population`` caps the members per
population: ``off`` (1: one trial per grid point, as before), ``N``, or ``auto`` (everything that
fuses, capped by memory: see :func:`auto_limit`). Results stay per grid point whatever the grouping.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from ..config import Config, config_with
from ..data.manifest import Manifest
from ..engine.population import population_key
from ..models import MODELS

log = logging.getLogger(__name__)

AUTO_MAX_MEMBERS = 64
MEMORY_SHARE = 0.25  # of the node's RAM that activations of one population may take
ACTIVATION_WORDS = 12  # floats kept per instance and hidden unit per member for backward (measured on abmil, rounded up)


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
    if len(members) == 1:
        return members[0].name
    return f"pop_{members[0].name}+{len(members) - 1}"


def fusion_blocker(cfg: Config) -> str | None:
    """Why this model cannot train as a population (None: it can)."""
    cls = MODELS.get(cfg.model.name)
    return getattr(cls, "population_note", None) if cls is not None else None


def auto_limit(cfg: Config, manifest: Manifest | None) -> int:
    """Members per population for ``sweep.population: auto``: all, up to :data:`AUTO_MAX_MEMBERS`, and
    as many as one step's activations fit in :data:`MEMORY_SHARE` of this node's RAM."""
    if manifest is None or "train" not in manifest.splits:
        return AUTO_MAX_MEMBERS
    sizes = sorted((b.n for b in manifest.split("train").bags()), reverse=True)
    step = sum(sizes[: cfg.train.max_bags_per_batch])
    if cfg.train.max_instances_per_batch:
        step = min(step, cfg.train.max_instances_per_batch)
    step = max(step, sizes[0] if sizes else 1)  # an oversize bag trains alone, whole
    per_member = step * cfg.model.hidden * 4 * ACTIVATION_WORDS
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(AUTO_MAX_MEMBERS, int(ram * MEMORY_SHARE // max(per_member, 1))))


def plan_populations(cfg: Config, points: list[dict[str, Any]], names: list[str], manifest: Manifest | None = None, announce=log.info) -> list[PopulationSpec]:
    """Group grid points into populations, in grid order (deterministic, so resumed sweeps agree).

    Raises ConfigError (from :func:`config_with`) naming the key when a grid value is invalid.
    """
    setting = cfg.sweep.population
    configs = [config_with(cfg, values) for values in points]  # validates every grid point up front
    blocker = fusion_blocker(cfg)
    if setting == "off" or len(points) <= 1:
        limit = 1
    elif blocker is not None:
        announce(f"sweep.population: model {cfg.model.name!r} does not fuse ({blocker}); one trial per grid point")
        limit = 1
    else:
        limit = setting if isinstance(setting, int) else auto_limit(cfg, manifest)
    groups: dict[str, list[Member]] = {}
    for values, name, c in zip(points, names, configs):
        groups.setdefault(population_key(c), []).append(Member(name, values))
    specs = []
    for members in groups.values():
        for i in range(0, len(members), limit):
            chunk = members[i : i + limit]
            specs.append(PopulationSpec(population_name(chunk), chunk))
    if limit > 1:
        sizes = [len(s.members) for s in specs]
        announce(f"{len(points)} grid point(s) in {len(specs)} population(s) of {min(sizes)}–{max(sizes)} member(s) (sweep.population={setting})")
    return specs
