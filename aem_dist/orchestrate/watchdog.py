"""No silent stall: a driver-side Tune callback that notices a trial (or the whole sweep) that stopped moving.

A trial is stalled when it has not reported for ``run.stall_timeout_s`` and the process that trains it
(rank 0's ``worker_pid`` from its last report; the trial itself with ``num_workers: 0``) is gone or idle:
under 5 % of a core over a short window with no runnable thread (``/proc``, read here or, for a process on
another node, by a 0-CPU task pinned to that node). A process that still computes is never stalled, however
long an epoch takes. Before a trial's first report its process is unknown, so time alone decides, at twice
the timeout. The sweep is stalled when trials wait, none runs and nothing has happened for
``run.wait_timeout_s`` (the cluster cannot place a trial).

Each stall is one warning line naming the trial, its last epoch and where its logs are. With
``run.on_stall: fail`` the stalled trial's actor is killed (Tune records an error, so ``--resume`` redoes it
from its last checkpoint; Train's workers go with their owner), or the stalled sweep is stopped through
:class:`StallStopper`; with ``warn`` the line is printed and the clock starts again.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import ray
from ray import tune

from ..config import Config
from .trials import trial_spec

log = logging.getLogger(__name__)

IDLE_SHARE = 0.05  # of one core: below this (and no runnable thread) a process is idle
_STOP_ALL: dict[str, bool] = {}  # StallStopper token → the sweep is stalled (Tune may copy the stopper; the token survives)


def process_activity(pid: int, window_s: float = 2.0) -> str:
    """'gone', 'idle' or 'busy' for process ``pid`` on this node, from two reads of /proc ``window_s`` apart."""

    def sample() -> tuple[float, bool] | None:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] in ("Z", "X"):
                return None
            running = False
            for task in glob.glob(f"/proc/{pid}/task/*/stat"):
                try:
                    with open(task) as f:
                        running = running or f.read().rsplit(")", 1)[1].split()[0] == "R"
                except OSError:
                    continue  # a thread that just ended
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), running
        except (OSError, IndexError, ValueError):
            return None

    first = sample()
    if first is None:
        return "gone"
    time.sleep(window_s)
    second = sample()
    if second is None:
        return "gone"
    busy = second[0] - first[0] >= IDLE_SHARE * window_s or (first[1] and second[1])
    return "busy" if busy else "idle"


def _activity_on(node_id: str, pid: int, window_s: float) -> str:
    """:func:`process_activity` of ``pid`` on Ray node ``node_id`` ('unknown' when the node cannot be asked)."""
    if node_id == ray.get_runtime_context().get_node_id():
        return process_activity(pid, window_s)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0)(process_activity).options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))
    try:
        return ray.get(probe.remote(pid, window_s), timeout=60)
    except Exception:  # noqa: BLE001 - a dead node cannot run the probe: its processes are gone
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        return "unknown" if node_id in alive else "gone"


def _ray_log(pid: int | None) -> str | None:
    """This node's Ray log file of process ``pid`` (worker-*-<pid>.out), if there is one."""
    if pid is None:
        return None
    try:  # Ray has no public API for a worker's log file; on another node the pattern below still finds it
        logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    except Exception:  # noqa: BLE001
        return None
    found = sorted(glob.glob(os.path.join(logs, f"worker-*-{pid}.out")))
    return found[-1] if found else None


class _Watch:
    """What the watchdog knows of one running trial."""

    def __init__(self, name: str, now: float):
        self.name = name
        self.since = now  # last report (or start)
        self.epoch: int | None = None
        self.pid: int | None = None
        self.node: str | None = None
        self.checked = now  # last process check
        self.probe: Future | None = None  # a process check under way (off Tune's event loop)
        self.probed_since = now  # the report time the probe under way was started for


class StallStopper(tune.Stopper):
    """Stops the whole experiment once :class:`StallWatchdog` found the sweep stalled (``run.on_stall: fail``)."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        return _STOP_ALL.get(self.token, False)


class StallWatchdog(tune.Callback):
    """Tune callback (driver): warns about, and with ``run.on_stall: fail`` ends, stalled trials and a stalled sweep.
    ``stalls`` keeps the lines it printed, for the sweep's closing error."""

    def __init__(self, cfg: Config, out_logs: str, window_s: float = 2.0):
        self.timeout = cfg.run.stall_timeout_s
        self.wait_timeout = cfg.run.wait_timeout_s
        self.fail = cfg.run.on_stall == "fail"
        self.out_logs = out_logs  # the run log folder (OUT/logs), named in each line
        self.window = min(window_s, self.timeout / 4)
        self.every = min(30.0, self.timeout / 3)  # how often a silent trial's processes are looked at
        self.watches: dict[str, _Watch] = {}
        self.last_event = time.monotonic()
        self.stalls: list[str] = []
        self.probes = ThreadPoolExecutor(max_workers=2, thread_name_prefix="aem-stall-probe")
        self.token = f"{os.getpid()}-{id(self)}"
        _STOP_ALL[self.token] = False

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks into the experiment state: without the helper threads and probes under way."""
        state = self.__dict__.copy()
        state["probes"] = None
        state["watches"] = {k: _Watch(w.name, w.since) for k, w in self.watches.items()}
        return state

    def stopper(self) -> StallStopper:
        return StallStopper(self.token)

    def _event(self) -> None:
        self.last_event = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        name = trial.custom_trial_name or trial_spec(trial.config, str(trial)).name
        self.watches[trial.trial_id] = _Watch(name, time.monotonic())
        self._event()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        watch = self.watches.get(trial.trial_id)
        if watch is not None:
            watch.since = time.monotonic()
            watch.epoch = result.get("epoch", watch.epoch)
            watch.pid = result.get("worker_pid", watch.pid)
            watch.node = result.get("node_id", watch.node)
        self._event()

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.watches.pop(trial.trial_id, None)
        self._event()

    on_trial_error = on_trial_complete

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        now = time.monotonic()
        running = {t.trial_id: t for t in trials if t.status == "RUNNING"}
        for trial_id, watch in list(self.watches.items()):
            if trial_id in running:
                self._check_trial(running[trial_id], watch, now)
        waiting = sum(t.status == "PENDING" for t in trials)
        if waiting and not running and now - self.last_event >= self.wait_timeout:
            self._sweep_stalled(waiting)

    def _check_trial(self, trial: Any, watch: _Watch, now: float) -> None:
        """Look at a silent trial's process in a helper thread (the probe takes seconds; Tune's loop must
        not wait), and act on the answer at a later step unless the trial reported meanwhile."""
        silent = now - watch.since
        if watch.probe is not None:
            if not watch.probe.done():
                return
            probe, watch.probe = watch.probe, None
            activity = "unknown" if probe.exception() is not None else probe.result()
            if watch.probed_since != watch.since or activity in ("busy", "unknown"):
                return  # it reported meanwhile, still computes (a long epoch), or cannot be told: no stall
            state = f"{activity} (pid {watch.pid}, node {watch.node[:12]})"
        elif silent < self.timeout or now - watch.checked < self.every:
            return
        elif watch.pid is None or watch.node is None:
            if silent < 2 * self.timeout:
                return  # its process is unknown before the first report: time alone decides, later
            state = "not known (no report yet)"
        else:
            watch.checked, watch.probed_since = now, watch.since
            watch.probe = self.probes.submit(_activity_on, watch.node, int(watch.pid), self.window)
            return
        epoch = "none" if watch.epoch is None else watch.epoch
        where = ", ".join(p for p in (_ray_log(watch.pid), self.out_logs) if p)
        action = "ending it (--resume redoes it from its last checkpoint)" if self.fail else "waiting on (run.on_stall: warn)"
        line = f"stalled trial {watch.name}: no report for {silent:.0f} s (last epoch: {epoch}), its training process {state}; logs: {where}; {action}"
        log.warning(line)
        self.stalls.append(line)
        watch.since = now  # warn: the clock starts again
        actor = getattr(getattr(trial, "temporary_state", None), "ray_actor", None)
        if self.fail and actor is not None:
            ray.kill(actor)  # Tune records the trial's error; its Train controller and workers die with their owner

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self.probes.shutdown(wait=False, cancel_futures=True)
        _STOP_ALL.pop(self.token, None)

    def _sweep_stalled(self, waiting: int) -> None:
        skip = ("node:", "memory", "object_store_memory", "accelerator_type", "bundle_group_")
        available = ray.available_resources()  # leaves out what is used up: 0 is what the user must see
        free = {k: available.get(k, 0.0) for k in ray.cluster_resources() if not k.startswith(skip) and "_group_" not in k}
        action = "stopping the sweep (--resume continues it)" if self.fail else "waiting on (run.on_stall: warn)"
        line = (f"stalled sweep: {waiting} trial(s) waiting and none running for {time.monotonic() - self.last_event:.0f} s (run.wait_timeout_s): "
                f"the cluster cannot place them (free now: {_short(free)}); logs: {self.out_logs}; {action}")
        log.warning(line)
        self.stalls.append(line)
        self._event()
        if self.fail:
            _STOP_ALL[self.token] = True


def _short(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items())) or "nothing"
