"""Ray callbacks that feed a driver-side :class:`~aem_dist.observe.metrics.MetricsExporter`.

The only module of ``aem_dist.observe`` that imports Ray.

* :class:`TuneMetricsCallback` — a ``ray.tune.Callback`` for sweeps. Tune runs its callbacks in the
  driver, so it feeds the sweep's exporter directly: every trial result (the rank-0
  ``EpochReport.flat()`` dict forwarded by ``TuneReportCallback``) becomes ``on_report`` with labels
  from the trial's config, trial states become ``aem_trials{state}``, and a compact table of trial
  states is printed as the sweep goes.

A single Ray Train run is a one-trial Tune run (see :mod:`aem_dist.orchestrate.train`), so the same
callback serves it: a ``ray.train.UserCallback`` would run in Train V2's controller actor, not in the
driver that serves the metrics.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import IO, Any, Callable, Mapping

from ray.tune import Callback

from ..config import Config
from .metrics import TRIAL_STATES, MetricsExporter, run_labels

log = logging.getLogger(__name__)

# Ray Tune's Trial.status → our state names (a paused trial waits for resources like a pending one).
TUNE_STATES = {"PENDING": "pending", "PAUSED": "pending", "RUNNING": "running", "TERMINATED": "terminated", "ERROR": "error"}
LABEL_KEYS = {"lam": "loss.lam", "seed": "train.seed", "model": "model.name"}


def config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """``dotted`` from a trial config given as flat dotted keys or as nested sections; None if absent."""
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def trial_labels(base: Config, trial_name: str, trial_config: Mapping[str, Any]) -> dict[str, str]:
    """RUN_LABELS of a trial: lam/seed/model from its config when swept, else from ``base``."""
    return run_labels(base, trial_name, **{label: config_value(trial_config, key) for label, key in LABEL_KEYS.items()})


class TuneMetricsCallback(Callback):
    """Feeds a sweep's exporter from Tune trial results and prints a live table of trial states.

    Args:
        base: the sweep's base config (run name; lam/seed/model for trials that do not sweep them).
        exporter: the sweep's started exporter, or None to only print the table.
        trial_name: trial → the ``trial`` label (default ``str(trial)``, Tune's trial name).
        print_table: print the trial table on state changes and every ``interval_s`` while results arrive.
        interval_s: least seconds between two tables printed for results only.
        max_rows: trials shown per table (running and failed ones first).
        stream: where the table goes (default: stdout at print time).

    The callback is pickled with Tune's RunConfig into ``tuner.pkl``; the exporter, lock and stream
    are left out of its pickled state (a restored sweep passes a new exporter).
    """

    def __init__(
        self,
        base: Config,
        exporter: MetricsExporter | None = None,
        *,
        trial_name: Callable[[Any], str] | None = None,
        print_table: bool = True,
        interval_s: float = 10.0,
        max_rows: int = 20,
        stream: IO[str] | None = None,
    ):
        # Tune pickles callbacks into its experiment state on storage: keep a copy without secrets.
        self.base = Config.model_validate(base.to_dict(redact=True))
        self.exporter = exporter
        self.trial_name = trial_name
        self.print_table = print_table
        self.interval_s = interval_s
        self.max_rows = max_rows
        self.stream = stream
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}  # trial id → state
        self._names: dict[str, str] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._last: dict[str, dict[str, Any]] = {}  # trial id → last result
        self._best_test: dict[str, float] = {}  # trial id → test AUC at its best epoch so far
        self._last_print = 0.0
        self._started = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(exporter=None, _lock=None, stream=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # --- bookkeeping -----------------------------------------------------------------------------

    def _name(self, trial: Any) -> str:
        return self.trial_name(trial) if self.trial_name is not None else str(trial)

    def _entries(self, trial: Any) -> list[tuple[str, str, Mapping[str, Any]]]:
        """(entry id, name, config) of each grid point a trial trains: its population's members (the
        sweep puts them in ``config["_population"]``), or the trial itself."""
        pop = (trial.config or {}).get("_population")
        if not pop:
            return [(trial.trial_id, self._name(trial), trial.config or {})]
        members = pop["members"]
        if len(members) == 1:  # one grid point (or a single run, named by ``trial_name`` if given)
            return [(trial.trial_id, self._name(trial) if self.trial_name else members[0]["name"], members[0]["values"])]
        return [(f"{trial.trial_id}#{k}", m["name"], m["values"]) for k, m in enumerate(members)]

    def _see(self, trial: Any, state: str | None = None) -> bool:
        """Record a trial's grid points (their state from ``state`` or the trial's Tune status); True
        if a state changed."""
        new = state or TUNE_STATES.get(str(trial.status), "pending")
        changed = False
        for eid, name, config in self._entries(trial):
            if eid not in self._names:
                self._names[eid] = name
                self._labels[eid] = trial_labels(self.base, name, config)
            changed |= self._states.get(eid) != new
            self._states[eid] = new
        return changed

    def counts(self) -> dict[str, int]:
        """Trials per state (every state present, zeros included)."""
        out = dict.fromkeys(TRIAL_STATES, 0)
        for state in self._states.values():
            out[state] += 1
        return out

    def _publish(self, changed: bool, force: bool = False) -> None:
        if self.exporter is not None:
            self.exporter.set_trial_states(self.counts())
        if not self.print_table:
            return
        now = time.monotonic()
        if changed or force or now - self._last_print >= self.interval_s:
            self._last_print = now
            print(self.table(), file=self.stream or sys.stdout, flush=True)

    # --- Tune hooks ------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._publish(self._see(trial, "running"))

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        with self._lock:
            changed = self._see(trial, "running")
            if "epoch" in result:  # an epoch report (a trial's closing "done/..." report carries none)
                per_member = result.get("members") or [result]  # a population reports each member
                for (eid, _, _), member in zip(self._entries(trial), per_member):
                    self._last[eid] = dict(member)
                    # The table shows the test AUC of the entry's best epoch so far (what results report),
                    # not the latest epoch's; a report without a selection counts as its own best.
                    if member.get("best/epoch", member["epoch"]) == member["epoch"] and "test/auc" in member:
                        self._best_test[eid] = member["test/auc"]
                    if self.exporter is not None:
                        self.exporter.on_report(self._labels[eid], member)
            self._publish(changed)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._publish(self._see(trial, "terminated"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._publish(self._see(trial, "error"))

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:  # failed, will be retried from its checkpoint: waiting again
            self._publish(self._see(trial, "pending"))

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune's own statuses are settled at the end of a step: the ground truth for every trial,
        # including those no event has told us about yet (still pending).
        with self._lock:
            changed = False
            for trial in trials:
                changed |= self._see(trial)
            self._publish(changed)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        with self._lock:
            for trial in trials:
                self._see(trial)
            self._publish(True, force=True)

    # --- the table -------------------------------------------------------------------------------

    def table(self) -> str:
        """The compact live table: a header of counts, then one row per trial."""
        c = self.counts()
        elapsed = int(time.monotonic() - self._started)
        head = f"[{self.base.run.name}] {len(self._states)} trials: " + ", ".join(f"{c[s]} {s}" for s in TRIAL_STATES)
        head += f"  ({elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d})"
        order = {"running": 0, "error": 1, "pending": 2, "terminated": 3}
        tids = sorted(self._states, key=lambda t: (order[self._states[t]], self._names[t]))
        rows = [("trial", "lam", "seed", "state", "epoch", "loss", "val_auc", "test_auc@best")]
        for tid in tids[: self.max_rows]:
            last, lab = self._last.get(tid, {}), self._labels[tid]
            rows.append((self._names[tid], lab["lam"], lab["seed"], self._states[tid], _cell(last.get("epoch"), "d"), _cell(last.get("train/loss")),
                _cell(last.get("val/auc")), _cell(self._best_test.get(tid))))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head] + ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if len(tids) > self.max_rows:
            lines.append(f"... {len(tids) - self.max_rows} more")
        return "\n".join(lines)


def _cell(value: Any, fmt: str = ".4f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return format(int(value), fmt) if fmt == "d" else format(float(value), fmt)
