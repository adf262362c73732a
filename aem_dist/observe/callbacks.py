"""Ray callbacks that feed a driver-side :class:`~aem_dist.observe.metrics.MetricsExporter`.

The only module of ``aem_dist.observe`` that imports Ray.

* :class:`TuneMetricsCallback` — a ``ray.tune.Callback`` for sweeps. Tune runs its callbacks in the
  driver, so it feeds the sweep's exporter directly: every trial result (the rank-0
  ``EpochReport.flat()`` dict the trial reports, see ``orchestrate.worker``) becomes ``on_report`` with labels
  from the trial's config, grid-point states become ``aem_trials{state}`` (planned points not started
  yet count as pending), and a short live table of grid points is printed as the sweep goes.

A single Ray Train run is a one-trial Tune run (see :mod:`aem_dist.orchestrate.train`), so the same
callback serves it: a ``ray.train.UserCallback`` would run in Train V2's controller actor, not in the
driver that serves the metrics.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import IO, Any, Callable, Mapping, Sequence

from ray.tune import Callback

from ..config import Config
from .console import RunLog
from .metrics import TRIAL_STATES, MetricsExporter, format_label, run_labels

log = logging.getLogger(__name__)

# Ray Tune's Trial.status → our state names (a paused trial waits for resources like a pending one).
TUNE_STATES = {"PENDING": "pending", "PAUSED": "pending", "RUNNING": "running", "TERMINATED": "terminated", "ERROR": "error"}
LABEL_KEYS = {"lam": "loss.lam", "seed": "train.seed", "model": "model.name"}
FOLD_KEY = "data.fold"


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


# Grid-point states shown in the table (Prometheus' aem_trials keeps TRIAL_STATES: see _METRIC_STATE).
FINISHED, STOPPED, INTERRUPTED = "finished", "stopped early", "interrupted"
_METRIC_STATE = {"pending": "pending", "running": "running", FINISHED: "terminated", STOPPED: "terminated", INTERRUPTED: "pending", "error": "error"}
_ORDER = {"running": 0, "error": 1, INTERRUPTED: 2, "pending": 3, STOPPED: 4, FINISHED: 5}


def tune_metrics(flat: dict[str, Any]) -> dict[str, Any]:
    """An ``EpochReport.flat()`` dict as a Tune metric dict: a population's ``members`` list becomes
    ``{"0": {...}, "1": {...}}``. Tune's loggers flatten nested dicts into scalar metrics
    (``members/1/val/auc``: one TensorBoard curve per member), while a list of dicts is no metric at all
    (TBXLoggerCallback warned "You are trying to log an invalid value" with the whole history)."""
    members = flat.get("members")
    if isinstance(members, list):
        flat = {**flat, "members": {str(k): m for k, m in enumerate(members)}}
    return flat


def member_results(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Each member's metrics of a population's result (``members``: ``{"0": {...}, "1": {...}}``, see
    :func:`tune_metrics`), or ``[result]`` for a single run."""
    members = result.get("members")
    if isinstance(members, Mapping):
        return [members[k] for k in sorted(members, key=int)]
    if isinstance(members, list):  # reports of an older version
        return members
    return [result]


class TuneMetricsCallback(Callback):
    """Feeds a sweep's exporter from Tune trial results and prints a live table of grid points.

    Args:
        base: the sweep's base config (run name; lam/seed/model for trials that do not sweep them).
        exporter: the sweep's started exporter, or None to only print the table.
        trial_name: trial → the ``trial`` label (default ``str(trial)``, Tune's trial name).
        planned: the grid points' names from the sweep's plan ("k of N grid points"; those Tune has not
            created a trial for yet count as pending, in the table and in ``aem_trials``).
        total: the number of points when their names are not known in advance (a search draws them).
        print_table: print the live table (see below).
        interval_s: least seconds between two blocks of rows whose epoch changed.
        full_every_s: least seconds between two full tables (every grid point) while the sweep runs.
        max_rows: grid points shown per full table (running and failed ones first).
        stream: where the table goes (default: stdout at print time).
        tracker: an :class:`aem_dist.observe.tracking.MlflowTracker` fed every grid point's epochs and end.

    The console stays short: a block lists only the rows that changed since the last block — at once
    (at the next Tune step) when a grid point changes state, at most every ``interval_s`` for epochs —
    and a full table of every grid point comes at most every ``full_every_s`` and at the end, with each
    point's final state: finished, stopped early (a scheduler stopped it), error or interrupted.

    The callback is pickled with Tune's RunConfig into ``tuner.pkl``; the exporter, tracker, lock and
    stream are left out of its pickled state (a restored sweep passes new ones).
    """

    def __init__(
        self,
        base: Config,
        exporter: MetricsExporter | None = None,
        *,
        trial_name: Callable[[Any], str] | None = None,
        planned: Sequence[str] = (),
        total: int | None = None,
        print_table: bool = True,
        interval_s: float = 60.0,
        full_every_s: float = 600.0,
        max_rows: int = 40,
        stream: IO[str] | None = None,
        tracker: Any = None,
    ):
        # Tune pickles callbacks into its experiment state on storage: keep a copy without secrets.
        self.base = Config.model_validate(base.to_dict(redact=True))
        self.exporter = exporter
        self.trial_name = trial_name
        self.planned = list(planned)
        self.total = max(total or 0, len(self.planned)) or None
        self.print_table = print_table
        self.interval_s = interval_s
        self.full_every_s = full_every_s
        self.max_rows = max_rows
        self.stream = stream
        self.tracker = tracker
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}  # entry (grid point) id → state
        self._names: dict[str, str] = {}
        self._labels: dict[str, dict[str, str]] = {}
        self._values: dict[str, Mapping[str, Any]] = {}  # entry id → its swept values
        self._last: dict[str, dict[str, Any]] = {}  # entry id → last epoch report
        self._best_test: dict[str, float] = {}  # entry id → test AUC at its best epoch so far
        self._changed: set[str] = set()  # entries whose row changed since the last block
        self._state_changed = False  # a state changed since the last block: print at the next step
        self._started = time.monotonic()
        self._last_block = -math.inf
        self._last_full = time.monotonic()
        self._announced = False

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(exporter=None, _lock=None, stream=None, tracker=None)
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

    def _see(self, trial: Any, state: str | None = None) -> None:
        """Record a trial's grid points in ``state`` (default: from the trial's Tune status; "terminated"
        becomes each point's final state, see :meth:`_final_state`)."""
        for eid, name, config in self._entries(trial):
            new = state or TUNE_STATES.get(str(trial.status), "pending")
            if new == "terminated":
                new = self._final_state(eid)
            if eid not in self._names:
                self._names[eid] = name
                self._labels[eid] = trial_labels(self.base, name, config)
                self._values[eid] = config
                if new == "pending":  # a planned point Tune created: counted as pending all along, no row yet
                    self._states[eid] = new
                    continue
            if self._states.get(eid) != new:
                self._states[eid] = new
                self._changed.add(eid)
                self._state_changed = True

    def _epochs_of(self, eid: str) -> int:
        epochs = config_value(self._values.get(eid, {}), "train.epochs")
        return int(epochs) if isinstance(epochs, (int, float)) else self.base.train.epochs

    def _final_state(self, eid: str) -> str:
        """A completed grid point is finished, or stopped early when its last epoch is short of its
        ``train.epochs`` (a scheduler stopped it; a resumed finished point reports no epoch at all)."""
        epoch = self._last.get(eid, {}).get("epoch")
        return STOPPED if isinstance(epoch, (int, float)) and epoch + 1 < self._epochs_of(eid) else FINISHED

    def counts(self) -> dict[str, int]:
        """Grid points per Prometheus state (every state present, zeros included); planned points Tune
        has not created a trial for yet are pending."""
        out = dict.fromkeys(TRIAL_STATES, 0)
        for state in self._states.values():
            out[_METRIC_STATE[state]] += 1
        out["pending"] += max(0, (self.total or 0) - len(self._states))
        return out

    def mark(self, state: str, names: Sequence[str] | None = None) -> None:
        """Set the state of the named grid points (default: every one not in a final state), e.g.
        :data:`INTERRUPTED` after Ctrl-C; the next table shows it."""
        with self._lock:
            for eid, name in self._names.items():
                if (names is None and self._states[eid] in ("pending", "running")) or (names is not None and name in names):
                    self._states[eid] = state
                    self._changed.add(eid)
                    self._state_changed = True

    def names(self, state: str) -> list[str]:
        """The grid points in ``state``."""
        return [self._names[e] for e, s in self._states.items() if s == state]

    def final_table(self) -> None:
        """Print the full table now (e.g. after Ctrl-C, when Tune ends no experiment)."""
        with self._lock:
            self._publish(final=True)

    def _publish(self, *, step: bool = False, final: bool = False) -> None:
        if self.exporter is not None:
            self.exporter.set_trial_states(self.counts())
        if not self.print_table:
            return
        now = time.monotonic()
        if not self._announced:
            self._announced = True
            self._print(
                self.header()
                + f"; the table below shows changed rows (epochs at most every {self.interval_s:g} s), all rows every {self.full_every_s:g} s and at the end"
            )
        if final:
            self._print(self.table())
            self._changed.clear()
            return
        if not step:  # blocks are printed from on_step_end: every event of one Tune step lands in one block
            return
        all_done = self.total is not None and sum(1 for s in self._states.values() if s not in ("pending", "running")) >= self.total
        if now - self._last_full >= self.full_every_s and not all_done:
            self._last_full = self._last_block = now
            self._state_changed = False
            self._print(self.table())
            self._changed.clear()
        elif self._changed and not all_done and (self._state_changed or now - self._last_block >= self.interval_s):
            self._last_block = now
            self._state_changed = False
            self._print(self.table(sorted(self._changed, key=lambda e: self._names[e])))
            self._changed.clear()

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)
        if RunLog.current is not None:  # the run log keeps every table too
            RunLog.current.write_lines(text.splitlines())

    # --- Tune hooks ------------------------------------------------------------------------------

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._see(trial, "running")
            self._publish()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        with self._lock:
            self._see(trial, "running")
            if "epoch" in result:  # an epoch report (a trial's closing "done/..." report carries none)
                for (eid, _, _), member in zip(self._entries(trial), member_results(result)):
                    self._last[eid] = dict(member)
                    self._changed.add(eid)
                    # The table shows the test AUC of the entry's best epoch so far (what results report),
                    # not the latest epoch's; a report without a selection counts as its own best.
                    if member.get("best/epoch", member["epoch"]) == member["epoch"] and "test/auc" in member:
                        self._best_test[eid] = member["test/auc"]
                    if self.exporter is not None:
                        self.exporter.on_report(self._labels[eid], member)
                    if self.tracker is not None:
                        self.tracker.epoch(self._names[eid], self._values[eid], member)
            self._publish()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._see(trial, "terminated")
            self._track_end(trial, "FINISHED")
            self._publish()

    def _track_end(self, trial: Any, status: str) -> None:
        if self.tracker is not None:
            for eid, _, _ in self._entries(trial):
                self.tracker.done(self._names[eid], self._values[eid], status)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:
            self._see(trial, "error")
            self._track_end(trial, "FAILED")
            self._publish()

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        with self._lock:  # failed, will be retried from its checkpoint: waiting again
            self._see(trial, "pending")
            self._publish()

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune's own statuses are settled at the end of a step: the ground truth for every trial,
        # including those no event has told us about yet (still pending).
        with self._lock:
            for trial in trials:
                self._see(trial)
            self._publish(step=True)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        with self._lock:
            for trial in trials:
                self._see(trial)
            self._publish(final=True)

    # --- the table -------------------------------------------------------------------------------

    def header(self) -> str:
        """'[run] 0:01:23  2 of 6 grid points finished · 3 running · 1 pending' (+ stopped, errors)."""
        elapsed = int(time.monotonic() - self._started)
        shown: dict[str, int] = dict.fromkeys((FINISHED, STOPPED, "running", "pending", "error", INTERRUPTED), 0)
        for state in self._states.values():
            shown[state] += 1
        total = self.total if self.total is not None else len(self._states)
        shown["pending"] += max(0, total - len(self._states))
        done = shown.pop(FINISHED)
        rest = " · ".join(f"{n} {state}" for state, n in shown.items() if n or state in ("running", "pending"))
        return f"[{self.base.run.name}] {elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}  {done} of {total} grid points finished · {rest}"

    def table(self, only: Sequence[str] | None = None) -> str:
        """The header, then one row per grid point — every one (running and failed first) or ``only``
        those given (entry ids, in that order)."""
        if only is None:
            tids = sorted(self._states, key=lambda t: (_ORDER[self._states[t]], self._names[t]))[: self.max_rows]
        else:
            tids = list(only)
        folds = any(config_value(v, FOLD_KEY) is not None for v in self._values.values())
        cols = ["trial", *(["fold"] if folds else []), "lam", "seed", "state", "epoch", "loss", "val_auc", "test_auc@best"]
        rows = [cols]
        for tid in tids:
            last, lab = self._last.get(tid, {}), self._labels[tid]
            epoch = last.get("epoch")
            shown_epoch = f"{int(epoch) + 1}/{self._epochs_of(tid)}" if isinstance(epoch, (int, float)) else "-"
            fold = [format_label(config_value(self._values[tid], FOLD_KEY))] if folds else []
            rows.append(
                [
                    self._names[tid],
                    *fold,
                    lab["lam"],
                    lab["seed"],
                    self._states[tid],
                    shown_epoch,
                    _cell(last.get("train/loss")),
                    _cell(last.get("val/auc")),
                    _cell(self._best_test.get(tid)),
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        lines = [self.header() + ("" if only is not None else "  (all grid points)")]
        lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        if only is None and len(self._states) > len(tids):
            lines.append(f"  ... {len(self._states) - len(tids)} more (every grid point is in trials.csv at the end)")
        return "\n".join(lines)


def _cell(value: Any, fmt: str = ".4f") -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return "-"
    return format(int(value), fmt) if fmt == "d" else format(float(value), fmt)
