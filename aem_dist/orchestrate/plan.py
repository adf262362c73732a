"""A sweep planned once: :class:`SweepPlan` (its points, their names and configs, the populations, the fusion notes).

Built before Ray starts (by the preflight checks, which validate every point while building it) and passed on to
the trial runner and the tables, so that the grid is expanded and each point's config built in one place.

**Populations** (fused trials): grid points whose configs differ only in
:data:`~aem_dist.engine.population.MEMBER_KEYS` and share their data seed fuse into one population — one Tune
trial that trains every member on the same batches (see :mod:`aem_dist.engine.population`), unless the model
says it cannot (its ``population_note``). ``sweep.population`` caps the members per population: ``off`` (1: one
trial per grid point), ``N``, or ``auto`` (everything that fuses, capped by memory: see :func:`auto_limit`).
Results stay per grid point whatever the grouping.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property

from .. import storage
from ..config import Config, check_sweep_space, config_with, grid_configs, grid_points, space_points
from ..data.folds import FOLD_KEY, check_folds
from ..data.limits import Limits
from ..data.manifest import Manifest, load_manifest
from ..engine.population import population_key
from ..models.registry import population_note
from ..storage import StorageOptions
from .trials import Member, PopulationSpec, population_name, trial_name

log = logging.getLogger(__name__)

AUTO_MAX_MEMBERS = 64
MEMORY_SHARE = 0.25  # of the node's RAM that activations of one population may take
ACTIVATION_WORDS = 12  # floats kept per instance and hidden unit per member for backward (measured on abmil, rounded up)


@dataclass
class SweepPlan:
    """What a run or sweep trains: ``configs`` (every grid point's config; a search's bounds and choices, which stand
    for its points; or the one run's), ``points`` (grid points by name; a search draws its points as it runs) and,
    computed on first use, ``populations`` (the Tune trials of a grid) with ``notes`` on fusion to say once."""

    cfg: Config
    configs: list[Config]
    points: list[Member]
    searched: bool
    notes: list[str] = field(default_factory=list)

    @property
    def single(self) -> bool:
        """One run (``train``), not a sweep: its folder is ``--out`` itself, no scheduler."""
        return not self.searched and not self.points[0].values

    @classmethod
    def build(cls, cfg: Config, sweep: bool = True) -> "SweepPlan":
        """Validates every point (ConfigError naming it). ``sweep=False``: the single run ``cfg``."""
        if sweep and cfg.sweep.search != "grid":  # each distribution's bounds and choices stand for its points
            check_sweep_space(cfg)
            return cls(cfg, [cfg] + [config_with(cfg, p) for p in space_points(cfg)], [], True)
        if not (sweep and cfg.sweep.grid):
            return cls(cfg, [cfg], [Member("run", {})], False)
        return cls(cfg, grid_configs(cfg), [Member(trial_name(p), p) for p in grid_points(cfg.sweep.grid)], False)

    @cached_property
    def populations(self) -> list[PopulationSpec]:
        """The grid points grouped into populations, in grid order (deterministic, so resumed sweeps agree); one trial per
        point, said in a note, under a scheduler. Raises ConfigError for a data.fold the dataset lacks."""
        cfg, setting = self.cfg, self.cfg.sweep.population
        if not self.points[0].values:  # a single run
            return [PopulationSpec("run", self.points)]
        if cfg.sweep.scheduler != "none" and len(self.points) > 1 and setting != "off":
            self.notes.append(f"sweep.population={setting} is not applied: sweep.scheduler={cfg.sweep.scheduler} stops trials one by one, "
                              "so every grid point is its own trial (unfused)")
            setting = "off"
        try:
            manifest = load_manifest(cfg.data.root, StorageOptions.from_config(cfg.storage, cfg.data.retries), Limits.from_config(cfg.data))
        except Exception:  # noqa: BLE001  (the trials report an unreadable dataset with its own clear error)
            manifest = None
        if manifest is not None:  # a data.fold the dataset lacks: one clear error now, not one per trial
            check_folds(manifest, [m.values.get(FOLD_KEY, cfg.data.fold) for m in self.points], storage.redact(cfg.data.root))
        blocker = population_note(cfg.model.name)
        if setting == "off" or len(self.points) <= 1:
            limit = 1
        elif blocker is not None:
            self.notes.append(f"sweep.population: model {cfg.model.name!r} does not fuse ({blocker}); one trial per grid point")
            limit = 1
        else:
            limit = setting if isinstance(setting, int) else auto_limit(cfg, manifest)
        groups: dict[str, list[Member]] = {}
        for member, c in zip(self.points, self.configs):
            groups.setdefault(population_key(c), []).append(member)
        specs = [PopulationSpec(population_name(ms[i : i + limit]), ms[i : i + limit]) for ms in groups.values() for i in range(0, len(ms), limit)]
        if limit > 1:
            sizes = [len(s.members) for s in specs]
            self.notes.append(f"{len(self.points)} grid point(s) in {len(specs)} population(s) of {min(sizes)}–{max(sizes)} member(s) "
                              f"(sweep.population={setting})")
        return specs


def auto_limit(cfg: Config, manifest: Manifest | None) -> int:
    """Members per population for ``sweep.population: auto``: all, up to :data:`AUTO_MAX_MEMBERS`, as long as
    one member's step activations fit in :data:`MEMORY_SHARE` of this node's RAM. A population's step runs
    chunk of members after chunk, each chunk's forward and backward sized to the CPU cache
    (:func:`aem_dist.engine.population.chunk_size`), so its activations are one chunk's, not K members':
    neither memory nor per-member speed falls with K, and the whole grid fuses."""
    if manifest is None or "train" not in manifest.splits:
        return AUTO_MAX_MEMBERS
    sizes = sorted((b.n for b in manifest.split("train").bags()), reverse=True)
    step = sum(sizes[: cfg.train.max_bags_per_batch])
    if cfg.train.max_instances_per_batch:
        step = min(step, cfg.train.max_instances_per_batch)
    step = max(step, sizes[0] if sizes else 1)  # an oversize bag trains alone, whole
    per_member = step * cfg.model.hidden * 4 * ACTIVATION_WORDS
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return AUTO_MAX_MEMBERS if per_member <= ram * MEMORY_SHARE else 1
